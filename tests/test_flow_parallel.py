"""Cells side by side (--max-workers) and a cell over two @parallel nodes, run for real."""

from __future__ import annotations

import math
import re

import pytest

from tests.test_flow import run_flow

pytestmark = pytest.mark.slow

DDP4 = {
    "name": "ddp4", "models": "llama-debug", "peft": "lora", "strategy": "ddp", "gpus": 2,
    "lr": [3e-3, 1e-2], "micro_batch": [2, 4], "seq_len": 32,
    "train": {"max_steps": 8, "timing_warmup_steps": 1, "timeout_s": 300, "save_adapter": False},
    "data": {"train_samples": 128, "val_samples": 16},
    "exclude": [{"lr": 1e-2, "micro_batch": 4}],  # 3 cells: enough to share the workers
}
TIMING = {"tokens_per_s", "tokens_per_s_per_device", "step_s", "epoch_s", "achieved_tflops",
          "wall_s", "train_s", "eval_s", "trainer_wall_s", "overhead_s", "queued_s", "started_at",
          "ended_at", "cores", "warmup", "out_dir", "peak_mem_gb", "peak_mem_gb_per_rank", "runtime_baseline_gb",
          "checkpoint_s", "cost_usd", "load_avg_start", "load_avg_end", "other_cpu_share"}


def _cells(run) -> dict[str, dict]:
    return {t["cell"].data["cell_id"]: t for t in run["gather"]}


def _measured(m: dict) -> dict:
    """Everything but timings; loss curves without their time stamps."""
    out = {k: v for k, v in m.items() if k not in TIMING}
    out["loss_curve"] = [{k: v for k, v in p.items() if k != "time_s"} for p in m["loss_curve"]]
    out["val_curve"] = [{k: v for k, v in p.items() if k != "time_s"} for p in m["val_curve"]]
    return out


def test_four_workers_give_the_results_of_one_worker(tmp_path):
    """The flow with four workers against its own cells trained one after another by the train
    step's function (`tasks.train_node`, what a task runs, less Metaflow)."""
    from metaflow import Run, namespace

    from steps.flow import tasks

    namespace(None)
    status, parallel_spec, output = run_flow(tmp_path, DDP4, max_workers=4)
    assert status == "successful", output[-3000:]
    run = Run(parallel_spec)
    parallel = _cells(run)
    serial = {}
    for planned in run["start"].task["cells"].data:
        metrics, _ = tasks.train_node(planned, tmp_path / "serial")
        serial[planned["cell"]["cell_id"]] = metrics
    assert sorted(serial) == sorted(parallel) and len(serial) == 3

    ports = set()
    for cid, task in parallel.items():
        log = task["log"].data
        ports.add(int(re.search(r"--master-port (\d+)", log).group(1)))
        # One cell's log holds its own two ranks' lines only.
        assert "step 8/8" in log
        assert cid in log.splitlines()[0]
        other = [c for c in parallel if c != cid]
        assert not any(o in log for o in other)
        m = task["metrics"].data
        assert m["outcome"] == "ok" and m["world_size"] == 2 and math.isfinite(m["val_loss"])
        assert _measured(m) == _measured(serial[cid])
    assert len(ports) == 3
    # Cells that ran at the same time ran on different cores (the others waited for theirs).
    runs = [t["metrics"].data for t in parallel.values()]
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            if a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"]:
                assert not set(a["cores"]) & set(b["cores"])


def test_two_node_parallel_ddp_cell(tmp_path):
    matrix = {**DDP4, "name": "two-nodes", "lr": 3e-3, "micro_batch": 4, "nodes": 2, "gpus": 1}
    status, pathspec, output = run_flow(tmp_path, matrix)
    assert status == "successful", output[-3000:]
    from metaflow import Run, namespace

    namespace(None)
    run = Run(pathspec)
    nodes = sorted(run["train"], key=lambda t: t["node"].data)
    assert [t["node"].data for t in nodes] == [0, 1]
    m0, m1 = (t["metrics"].data for t in nodes)
    assert m0["outcome"] == "ok" and m0["world_size"] == 2 and m0["node_rank"] == 0
    assert m1 == {**m1, "outcome": "ok", "node_rank": 1}  # node 1 reports its exit; rank 0 measures
    assert "--nnodes 2" in nodes[0]["log"].data and "--node-rank 1" in nodes[1]["log"].data
    df = run["join"].task["results"].data
    assert len(df) == 1 and df.iloc[0]["world_size"] == 2 and df.iloc[0]["nodes"] == 2
    assert df.iloc[0]["outcome"] == "ok" and math.isfinite(df.iloc[0]["val_loss"])
    gathered = run["gather"].task["log"].data
    assert "===== node 1 =====" in gathered
