"""The flow for real: Metaflow's Runner API runs a small matrix, the Client API reads it back."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from steps.plan.settings import CONTENDED_SHARE
from steps.results.table import COLUMNS
from tests.conftest import METAFLOW_ROOT, REPO

pytestmark = pytest.mark.slow

FLOW = str(REPO / "flows" / "finetune_matrix.py")
# Two strategies, each twice (seeds 0 and 1), and two goals. The adapters cover the MLP and the
# output head, so that the random, frozen base learns in 20 steps.
SMALL = {
    "name": "small", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"],
    "gpus": 2, "lr": [1e-2], "micro_batch": 4, "seq_len": 32, "repeats": 2,
    "train": {"max_steps": 20, "timing_warmup_steps": 2, "timeout_s": 300,
              "lora": {"target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]}},
    "data": {"task": "synthetic-reverse", "train_samples": 256, "val_samples": 32},
    "goals": [{"name": "best-quality", "minimize": "val_loss"},
              {"name": "fastest", "maximize": "tokens_per_s", "max_val_loss": 100}],
}


def card_payload(html: str) -> str:
    """A Metaflow card embeds its components as base64 JSON."""
    (blob,) = re.findall(r'__MF_DATA__\["[^"]+"\] = "([^"]+)"', html)
    return base64.b64decode(blob).decode()


def run_flow(tmp_path, matrix: dict, **run_kwargs):
    from metaflow import Runner

    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    env = {"FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    with Runner(FLOW, show_output=False, env=env, cwd=str(METAFLOW_ROOT),
                config=[("matrix", str(path))]) as runner:
        result = runner.run(**run_kwargs)
        return result.status, result.run.pathspec, result.stdout + result.stderr


def test_matrix_runs_end_to_end_and_reads_back_through_the_client(tmp_path):
    status, pathspec, output = run_flow(tmp_path, SMALL, max_workers=2)
    assert status == "successful", output[-4000:]

    from metaflow import Run, namespace
    from metaflow.cards import get_cards

    namespace(None)
    run = Run(pathspec)
    df = run["join"].task["results"].data
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert len(df) == 4 and set(df["outcome"]) == {"ok"}
    assert (df["tokens_per_s"] > 0).all() and df["val_loss"].map(math.isfinite).all()
    assert sorted(df["world_size"]) == [1, 1, 2, 2] and set(df["run_id"]) == {run.id}
    assert df["cell_id"].is_unique
    # a row per repeat, each with its seed
    assert sorted(zip(df["strategy"], df["repeat"], df["train.seed"])) == [
        ("ddp", 0, 0), ("ddp", 1, 1), ("single", 0, 0), ("single", 1, 1)]

    out = tmp_path / "reports" / run.id
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), df)
    assert len(pd.read_csv(out / "results.csv")) == 4
    report = (out / "report.md").read_text()
    for cid in df["cell_id"]:
        assert cid in report
        assert sorted(p.name for p in (out / "cells" / cid).iterdir()) == [
            "adapter", "cell.yaml", "metrics.json", "train.log"]  # working files cleaned up
    # The plan start printed, kept beside the results; the report scores it; the store learned the run.
    plan = pd.read_csv(out / "plan.csv")
    assert sorted(plan["cell_id"]) == sorted(df["cell_id"]) and plan["tokens_per_s_low"].notna().all()
    assert "## Planned vs measured" in report and "| catalog |" in report  # the probe is off in tests
    kept = tmp_path / "reports" / "calibration" / "cpu.jsonl"
    stored = [json.loads(line) for line in kept.read_text().splitlines()] if kept.exists() else []
    # how busy the machine was (the share needs a timed window of 1 s or more); a busy cell is not learned from
    assert df["load_avg_start"].notna().all() and "other_cpu_share" in df
    quiet = df[~(df["other_cpu_share"] > CONTENDED_SHARE)]
    assert sorted(e["row"]["cell_id"] for e in stored) == sorted(quiet["cell_id"])
    train_tasks = list(run["train"])
    assert sorted(t["metrics"].data["cell_id"] for t in train_tasks) == sorted(df["cell_id"])
    assert run["start"].task["cells"].data[0]["cell"]["matrix"] == "small"
    # The plan, in start's log: every cell's memory, verdict, time and cost, then the totals.
    start_log = run["start"].task.stdout
    assert "4 cells: 4 run, 0 refused; 0 predicted out of memory" in start_log
    assert "Cells predicted to fit: 4, one after another" in start_log
    cards = get_cards(run["end"].task)
    assert len(cards) == 1
    card_data = card_payload(cards[0].get())
    assert all(cid in card_data for cid in df["cell_id"])
    # The end card is the report: findings, tables and the same figures as report.md / .html.
    figures = sorted(p.name for p in (out / "plots").iterdir())
    assert figures == ["cost_vs_time.png", "loss_curves.png", "peak_memory.png", "throughput_vs_gpus.png"]
    assert all(f"](plots/{f})" in report for f in figures)
    assert "## Key findings" in card_data and "## Scaling" in card_data
    # The report and the end card open with the decision; decision.json holds it for other tools.
    assert [h for h in report.splitlines() if h.startswith("## ")][0] == "## Decision"
    assert "## Decision" in card_data and "best-quality" in card_data
    decided = {g["name"]: g for g in json.loads((out / "decision.json").read_text())["goals"]}
    assert list(decided) == ["best-quality", "fastest"]
    # The configurations compete on their two repeats; single and ddp must end with equal losses
    # (one equivalence class per seed), so they are tied on validation loss.
    best, fastest = decided["best-quality"], decided["fastest"]
    assert best["default"] is False and best["excluded"] == {} and best["candidates"] == 2, best
    assert best["repeats"] == 2 and len(best["choice_cells"]) == 2
    cells = df.set_index("cell_id")
    chosen = cells.loc[best["choice_cells"]]
    assert chosen["strategy"].nunique() == 1 and sorted(chosen["repeat"]) == [0, 1]
    assert best["value"] == pytest.approx(chosen["val_loss"].mean())
    low, high = best["interval"]
    assert low < best["value"] < high and best["noise"].startswith("the 95% interval of the mean")
    other = cells.loc[best["tied_with"], "strategy"].tolist()
    assert other and other != chosen["strategy"].iloc[:1].tolist(), best
    assert "mean of 2 repeats" in report and "Tied within the noise with" in report
    assert fastest["constraints"] == {"max_val_loss": 100} and fastest["interval"][0] < fastest["value"]
    assert len(re.findall(r'"type":\s*"image"', card_data)) == len(figures)
    assert (out / "report.html").read_text().count("data:image/png;base64,") == len(figures)
    # A card per cell: its settings, its loss curve (every step) and its metrics table.
    for task in run["gather"]:
        m, cid = task["metrics"].data, task["cell"].data["cell_id"]
        assert task["loss_curve"].data == m["loss_curve"] and len(m["loss_curve"]) == 20
        assert task["log"].data.startswith("$ ") and "step 20/20" in task["log"].data
        (cell_card,) = get_cards(task, id="cell")
        payload = card_payload(cell_card.get())
        assert cid in payload and '"vegaChart"' in payload.replace("VegaChart", "vegaChart")
        assert f'{m["loss_curve"][-1]["loss"]}' in payload and "tokens/s" in payload

    # Two cells at once (--max-workers 2): their own ports, folders and cores.
    logs = {cid: (out / "cells" / cid / "train.log").read_text().splitlines()[1] for cid in df["cell_id"]}
    ports = {line.split("port ")[1].split(",")[0] for line in logs.values()}
    assert len(ports) == 4
    # The ranks run at the flow's own priority; Metaflow's other tasks and card processes below it.
    assert {line.split("nice ")[1] for line in logs.values()} == {str(os.getpriority(os.PRIO_PROCESS, 0))}
    if len(os.sched_getaffinity(0)) >= 2:
        singles = [t["metrics"].data for t in train_tasks if t["cell"].data["strategy"] == "single"]
        a, b = sorted(singles, key=lambda m: m["started_at"])
        assert b["started_at"] < a["ended_at"], "the two 1-process cells did not overlap"
        assert not set(a["cores"]) & set(b["cores"])

    # make gpu-evidence's flow part scores a run as the report does, and keeps its report
    from steps.report.evidence import flow_scores

    scored = flow_scores.score(tmp_path / "reports", tmp_path / "evidence" / "flow.json")
    assert scored["finished"] and scored["run"] == str(out)
    assert sorted(c["cell_id"] for c in scored["cells"]) == sorted(df["cell_id"])
    assert len(scored["planned_vs_measured"]) == 4
    assert {e["quantity"] for e in scored["errors"]} >= {"mem_gb", "tokens_per_s", "wall_s"}
    assert sorted(p.name for p in (tmp_path / "evidence" / "flow").iterdir()) == sorted(flow_scores.KEPT)


def test_a_matrix_with_three_mistakes_fails_before_any_training(tmp_path):
    bad = {**SMALL, "strategy": ["single", "dpp"], "lr": -1e-3, "learning_rate": 0.1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    env = {**os.environ, "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, FLOW, "--config", "matrix", str(path), "run"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "3 problem(s)" in output
    assert "strategy[1]: 'dpp' is not allowed" in output
    assert "lr[0]: -0.001 is invalid: input should be greater than 0" in output
    assert "learning_rate: unknown key (did you mean 'lr'?)" in output
    assert "Task is starting" not in output and "Traceback" not in output
    assert not (tmp_path / "reports").exists()
