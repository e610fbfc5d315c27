"""The trainer under torchrun, for real: 2-process DDP on CPU (gloo), metrics.json contract."""

from __future__ import annotations

import math
import os

import pytest

from steps.flow import launcher
from tests.conftest import make_cell, torchrun_cells, torchrun_trainer

pytestmark = pytest.mark.slow

DDP = make_cell(strategy="ddp", gpus=2, micro_batch=2, train={"max_steps": 8})


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """2 ranks x micro-batch 2, 8 steps: the launch both DDP tests read."""
    return torchrun_trainer(DDP, tmp_path_factory.mktemp("ddp"))


def test_ddp_two_processes_trains_and_writes_metrics(ddp):
    cell = DDP
    proc, m = ddp
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert m["outcome"] == "ok" and m["error"] is None
    assert m["cell_id"] == cell.cell_id and m["world_size"] == 2 and m["global_batch"] == 4
    assert len(m["peak_mem_gb_per_rank"]) == 2 and min(m["peak_mem_gb_per_rank"]) > 0.1
    assert m["peak_mem_gb"] == max(m["peak_mem_gb_per_rank"])
    # the resident libraries and process group before the model: most of a debug cell's peak
    assert 0.2 < m["runtime_baseline_gb"] < m["peak_mem_gb"]
    assert m["tokens_per_s"] > 0
    assert m["tokens_per_s_per_device"] == pytest.approx(m["tokens_per_s"] / 2)
    assert [p["step"] for p in m["loss_curve"]] == list(range(1, 9))
    assert all(math.isfinite(p["loss"]) for p in m["loss_curve"])
    assert m["loss_curve"][-1]["loss"] < m["loss_curve"][0]["loss"]
    assert math.isfinite(m["val_loss"]) and 0 <= m["accuracy"] <= 1
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["tf32"] is False and m["mfu"] is None  # train.tf32 auto: no TF32 (and no peak) on a CPU
    assert m["train_s"] > 0 and m["trainer_wall_s"] >= m["train_s"]
    assert m["warmup"]["steps"] == 1
    assert "step 8/8" in proc.stdout  # rank 0 alone prints progress
    assert proc.stdout.count("step 8/8") == 1


def test_launcher_runs_a_cell_with_its_own_log_and_rank_prefixes(tmp_path):
    cell = make_cell(strategy="ddp", gpus=2, micro_batch=2, train={"max_steps": 3})
    m = launcher.run_cell(cell, tmp_path / "cell", echo=False)
    assert m["outcome"] == "ok" and m["exit_code"] == 0
    assert m["wall_s"] > m["trainer_wall_s"] > m["train_s"] > 0
    assert len(m["cores"]) == min(2, len(os.sched_getaffinity(0)))
    log = (tmp_path / "cell" / "train.log").read_text()
    assert "[default0]:step 3/3" in log and "[default1]:step" not in log
    assert sorted(p.name for p in (tmp_path / "cell").iterdir()) == ["adapter", "cell.yaml", "metrics.json", "train.log"]


def test_ddp_gives_the_same_losses_as_one_process_with_the_same_global_batch(ddp, tmp_path):
    """2 ranks x micro-batch 2 == 1 rank x micro-batch 4 == 1 rank x 2 x accumulation 2, over
    8 steps (the two one-process cells share one launch)."""
    singles = {"single mb4": make_cell(micro_batch=4, train={"max_steps": 8}),
               "single mb2 x ga2": make_cell(micro_batch=2, grad_accum=2, train={"max_steps": 8})}
    _, found = torchrun_cells(list(singles.values()), [tmp_path / n.replace(" ", "_") for n in singles])
    runs = {**dict(zip(singles, found)), "ddp 2 x mb2": ddp[1]}
    curves = {}
    for name, m in runs.items():
        assert m["outcome"] == "ok", m["error"]
        assert len(m["loss_curve"]) == 8, name
        curves[name] = [p["loss"] for p in m["loss_curve"]]
    ref = curves["single mb4"]
    for name, curve in curves.items():
        assert curve == pytest.approx(ref, rel=1e-4), name


def test_a_failing_cell_writes_error_metrics_and_exits_non_zero(tmp_path):
    empty_model_dir = tmp_path / "not-a-model"
    empty_model_dir.mkdir()
    proc, m = torchrun_trainer(make_cell(model=str(empty_model_dir)), tmp_path / "out")
    assert proc.returncode != 0
    assert m["outcome"] == "error"
    assert str(empty_model_dir) in m["error"] or "config" in m["error"].lower()
    assert m["loss_curve"] == []
