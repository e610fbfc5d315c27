"""The launcher for real: torchrun vs DeepSpeed's launcher, time limits, no stray processes."""

from __future__ import annotations

import psutil
import pytest

from steps.flow import launcher
from tests.conftest import make_cell

pytestmark = pytest.mark.slow


def _trainers_left(out) -> list[psutil.Process]:
    left = []
    for p in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
            left.append(p)
    return left


def test_deepspeed_launcher_gives_the_losses_of_torchrun(tmp_path):
    runs = {}
    for name in ("torchrun", "deepspeed"):
        cell = make_cell(strategy="zero2", gpus=2, train={"launcher": name, "save_adapter": False})
        runs[name] = (cell, launcher.run_cell(cell, tmp_path / name, echo=False))
    (a, ma), (b, mb) = runs["torchrun"], runs["deepspeed"]
    assert a.cell_id == b.cell_id  # how a cell is launched is not part of what it measures
    assert ma["outcome"] == mb["outcome"] == "ok", (ma["error"], mb["error"])
    assert [p["loss"] for p in ma["loss_curve"]] == [p["loss"] for p in mb["loss_curve"]]
    assert ma["val_loss"] == mb["val_loss"]
    log = (tmp_path / "deepspeed" / "train.log").read_text()
    assert "deepspeed.launcher.runner" in log.splitlines()[0]
    assert "[default0]:step 6/6" in log  # the trainer prefixes its lines with the rank
    # DeepSpeed's inference-only shared-memory all-reduce is neither built nor loaded.
    for name in runs:
        assert "deepspeed_shm_comm" not in (tmp_path / name / "train.log").read_text()


def test_a_cell_past_its_time_limit_is_a_timeout_with_its_curve(tmp_path):
    cell = make_cell(strategy="ddp", gpus=2, train={
        "fault": {"kind": "hang", "at_step": 4, "rank": 1}, "hang_after_s": None, "timeout_s": 25,
        "save_adapter": False})
    m = launcher.run_cell(cell, tmp_path, echo=False)
    assert m["outcome"] == "timeout" and "timeout_s=25" in m["error"]
    assert [p["step"] for p in m["loss_curve"]] == [1, 2, 3] and m["stopped_after_steps"] == 3
    assert 25 <= m["wall_s"] < 25 + launcher.KILL_GRACE_S + 5
    assert not _trainers_left(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.yaml", "metrics.json", "train.log"]


def test_a_hung_rank_is_stopped_with_every_rank_stack_in_the_log(tmp_path):
    cell = make_cell(strategy="ddp", gpus=2, train={
        "fault": {"kind": "hang", "at_step": 3, "rank": 1}, "hang_after_s": 8, "save_adapter": False})
    m = launcher.run_cell(cell, tmp_path, echo=False)
    assert m["outcome"] == "hang" and m["stopped_after_steps"] == 2
    log = (tmp_path / "train.log").read_text()
    # faulthandler's dump from both ranks: rank 1 sleeping in the fault, rank 0 in a collective.
    assert "[default1]:  File" in log and "in inject_fault" in log
    assert "[default0]:  File" in log
    assert not _trainers_left(tmp_path)


def test_one_process_runs_the_trainer_without_torchrun(tmp_path):
    cell = make_cell(train={"save_adapter": False})
    cmd = launcher.trainer_command(cell, tmp_path / "cell.yaml", tmp_path, 12345)
    assert cmd[1:3] == ["-m", "steps.train"]
    m = launcher.run_cell(cell, tmp_path, echo=False)
    assert m["outcome"] == "ok" and m["world_size"] == 1
    assert 0 < m["overhead_s"] < m["wall_s"]
    assert (tmp_path / "train.log").read_text().splitlines()[2].startswith("[default0]:")
