"""compute: slurm through the flow, against a real one-node Slurm cluster the tests start (munge,
slurmctld, slurmd; GPUs as gres on stand-in device files, CPU processes standing in for them):
the default matrix's cells as jobs with the local run's losses, a job past its time limit, a
failed cell that `resume` submits again alone, and Ctrl-C leaving no job behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from steps import REPO_ROOT
from steps.flow import launcher
from steps.plan.schema import CellSpec
from steps.results.metrics import PARTIAL_CURVES, CellMetrics
from tests.conftest import METAFLOW_ROOT, interrupt
from tests.engines.slurm import client_env, slurm_cluster
from tests.test_flow_failures import save_model

pytestmark = [pytest.mark.slow, pytest.mark.slurm]

FLOW = str(REPO_ROOT / "flows" / "finetune_matrix.py")
STEPS = 20  # the default matrix's cells, shortened from its 150 steps
# Same code, same process layout, same CPU: the losses agree to the last digits; this allows
# for float summation order across runs.
LOSS_TOLERANCE = 1e-5
REMOTE = {"gres": "gpu:{gpus}", "poll_s": 0.5, "startup_allowance_s": 300}
# A cell that trains two steps, then waits without using the CPU until it is stopped (as a rank
# stuck in a collective would; its hang watch is not due for 15 minutes).
LONG = {"fault": {"kind": "hang", "at_step": 3}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from slurm_cluster(tmp_path_factory)


def default_matrix(**changes) -> dict:
    matrix = yaml.safe_load((REPO_ROOT / "configs" / "matrix" / "default.yaml").read_text())
    matrix["train"]["max_steps"] = STEPS
    return {**matrix, "compute": "slurm", "remote": dict(REMOTE), **changes}


def runner(cluster, tmp_path: Path, matrix: dict | None):
    """A Runner whose tasks talk to `cluster` (`run` with the matrix; `resume` without)."""
    from metaflow import Runner

    env = client_env(cluster, FINETUNE_MATRIX_REPORTS=str(tmp_path / "reports"))
    if matrix is None:
        return Runner(FLOW, show_output=False, env=env, cwd=str(METAFLOW_ROOT))
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return Runner(FLOW, show_output=False, env=env, cwd=str(METAFLOW_ROOT), config=[("matrix", str(path))])


@pytest.fixture(scope="module")
def default_run(cluster, tmp_path_factory):
    """The default matrix (20 steps a cell) as Slurm jobs, two cells at a time."""
    tmp = tmp_path_factory.mktemp("slurm-default")
    with runner(cluster, tmp, default_matrix()) as r:
        result = r.run(max_workers=2)
        output = result.stdout + result.stderr
        assert result.status == "successful", output[-4000:]
        return result.run["join"].task["results"].data, tmp / "reports" / result.run.id, output


def test_the_default_matrix_runs_as_slurm_jobs_with_the_local_run_s_losses(cluster, default_run, tmp_path):
    df, folder, output = default_run
    assert len(df) == 4 and set(df["outcome"]) == {"ok"}, df[["cell_id", "outcome", "error"]]
    assert set(df["job_status"]) == {"COMPLETED"} and set(df["job_nodes"]) == {cluster.node}
    assert df["job_id"].map(str.isdigit).all() and df["job_id"].is_unique
    assert (df["job_name"] == "fm-" + df["cell_id"]).all()
    assert (df["queued_s"] >= 0).all() and df["cost_usd"].isna().all()  # no remote.price_per_gpu_hour
    for row in df.itertuples():
        cell_dir = folder / "cells" / row.cell_id
        script = (cell_dir / "job.sbatch").read_text()
        gres = "#SBATCH --gres=gpu:2" if row.world_size == 2 else "#SBATCH --gres=gpu:1"
        assert gres in script and f"#SBATCH --cpus-per-task={row.world_size}" in script
        assert (cell_dir / f"slurm-{row.job_id}.out").read_text().startswith(
            f"finetune-matrix: cell {row.cell_id}, Slurm job {row.job_id} on {cluster.node} (node 0 of 1)")
        assert f"slurm {row.job_id}: COMPLETED on {cluster.node}" in output
    assert "cost unknown: compute slurm prices a cell at your cluster's own rate" in output

    # The local run of the same cells: this machine's launcher, no Slurm (two at a time: the
    # launcher gives each its cores).
    def local_run(cell_id: str) -> CellMetrics:
        cell = CellSpec.model_validate(yaml.safe_load((folder / "cells" / cell_id / "cell.yaml").read_text()))
        return launcher.run_cell(cell, tmp_path / cell_id, echo=False)

    with ThreadPoolExecutor(2) as pool:
        locals_ = dict(zip(df["cell_id"], pool.map(local_run, df["cell_id"]), strict=True))
    for row in df.itertuples():
        local = locals_[row.cell_id]
        assert local.outcome == "ok", local.error
        assert row.val_loss == pytest.approx(local.val_loss, rel=LOSS_TOLERANCE), row.cell_id
        assert [p["loss"] for p in json.loads(row.loss_curve)] == pytest.approx(
            [p.loss for p in local.loss_curve], rel=LOSS_TOLERANCE)


def _long_job(cluster, name_part: str, timeout: float = 180) -> str:
    """The id of the running job whose name has `name_part`, once its trainer has trained a step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for job in cluster.jobs():
            record = cluster.job(job)
            if name_part in record.get("JobName", "") and record.get("JobState") == "RUNNING":
                return job
        time.sleep(0.5)
    raise TimeoutError(f"no running job named *{name_part}* within {timeout:.0f} s")


def _trained_a_step(folder: Path, timeout: float = 120) -> None:
    """Once a cell under `folder` has appended a step to its curve."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.stat().st_size for p in folder.glob(f"*/cells/*/{PARTIAL_CURVES}")):
            return
        time.sleep(0.5)
    raise TimeoutError(f"no cell under {folder} trained a step within {timeout:.0f} s")


def test_a_job_past_its_time_limit_is_a_timeout_and_resume_submits_only_the_failed_cell(cluster, tmp_path):
    """Two cells: one trains until Slurm stops it at its time limit (`timeout`, a result); one
    loads a model folder whose weights file is broken and fails the run (retries: 0). With the
    folder mended, `resume` submits one job: the failed cell's; the timed-out row is cloned."""
    from metaflow import Run, namespace

    namespace(None)
    broken = tmp_path / "model"
    save_model(broken, weights=False)
    matrix = default_matrix(models=["llama-debug", str(broken)], strategy="single", lr=1e-2, retries=0,
                            include=[{"models": "llama-debug", "train": LONG}])
    timed_out: dict[str, str] = {}

    def stop_the_long_job():  # Slurm's own limit, reached now: the job has --time, it is moved past it
        try:
            job = _long_job(cluster, "llama-debug")
            _trained_a_step(tmp_path / "reports")
            cluster.time_out(job)
            timed_out["job"] = job
        except Exception as exc:  # noqa: BLE001 - said by the test; the flow is not left waiting on a hung job
            timed_out["error"] = repr(exc)
            for job in cluster.jobs():
                cluster.run("scancel", job, check=False)

    watcher = threading.Thread(target=stop_the_long_job, daemon=True)
    watcher.start()
    with runner(cluster, tmp_path, matrix) as r:
        first = r.run(max_workers=4)  # both cells start at once: the failing one waits for the other
        output = first.stdout + first.stderr
    watcher.join(timeout=5)
    assert "error" not in timed_out, timed_out["error"]
    assert first.status == "failed", output[-4000:]
    trains = list(Run(first.run.pathspec)["train"])
    done = [t for t in trains if t.successful]
    assert len(done) == 1 and len(trains) == 2, output[-4000:]
    m = CellMetrics.from_dict(done[0]["metrics"].data)
    assert (m.outcome, m.job_status, m.job_id) == ("timeout", "TIMEOUT", timed_out["job"]), m.error
    assert m.error.startswith(f"Slurm job {timed_out['job']} stopped at its time limit (TIMEOUT, --time=")
    assert m.stopped_after_steps == 2 and [p.step for p in m.loss_curve] == [1, 2]  # the curve until it hung
    failed = next(t for t in trains if not t.successful)
    assert "Error while deserializing header" in failed["metrics"].data["error"]
    jobs_before = {r["JobId"] for r in map(cluster.job, _all_job_ids(cluster))}

    save_model(broken)  # the cause, mended
    with runner(cluster, tmp_path, None) as r:
        second = r.resume(origin_run_id=first.run.id, max_workers=2)
        assert second.status == "successful", (second.stdout + second.stderr)[-4000:]
    df = Run(second.run.pathspec)["join"].task["results"].data
    assert sorted(df["outcome"]) == ["ok", "timeout"]
    new_jobs = {r["JobId"] for r in map(cluster.job, _all_job_ids(cluster))} - jobs_before
    assert new_jobs == {df.loc[df["outcome"] == "ok", "job_id"].item()}  # one job: the failed cell's
    assert cluster.jobs() == []


def _all_job_ids(cluster) -> list[str]:
    """Every job the controller still remembers (MinJobAge keeps ended ones an hour)."""
    out = cluster.run("scontrol", "show", "job", "-o").stdout
    return [line.split("JobId=", 1)[1].split()[0] for line in out.splitlines() if "JobId=" in line]


def test_ctrl_c_on_the_flow_cancels_its_jobs(cluster, tmp_path):
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(default_matrix(strategy="ddp", lr=1e-2, train={**default_matrix()["train"], **LONG})))
    log = tmp_path / "flow.log"
    with log.open("w") as out:  # a file, not a pipe: the flow echoes the trainer's log
        proc = subprocess.Popen([sys.executable, FLOW, "--config", "matrix", str(path), "run"], cwd=METAFLOW_ROOT,
                                env=client_env(cluster, FINETUNE_MATRIX_REPORTS=str(tmp_path / "reports")),
                                stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        job = _long_job(cluster, "llama-debug")
        interrupt(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert cluster.wait(job, timeout=30)["JobState"] == "CANCELLED"
    assert cluster.jobs() == [], cluster.run("squeue").stdout
    assert f"slurm {job}: cancelled (the step ended before the job)" in log.read_text()


def test_a_job_whose_node_fails_is_retried_as_a_new_job(cluster, tmp_path):
    """The node goes down under a running job (`scontrol update State=DOWN`, as when a node
    stops answering): the job ends NODE_FAIL, Slurm does not run it again (--no-requeue), the
    cell's attempt is an `error` and the flow retries it (`retries: 1`) as a new job once the node
    is back; the cell ends `ok`, its row naming the second job."""
    from metaflow import Run, namespace

    namespace(None)
    matrix = default_matrix(models=["llama-debug"], strategy="single", lr=1e-2, retries=1)
    failed: dict[str, object] = {}

    def fail_the_node():
        try:
            job = _long_job(cluster, "llama-debug")
            cluster.run("scontrol", "update", f"NodeName={cluster.node}", "State=DOWN", "Reason=finetune-matrix test")
            failed["record"] = cluster.wait(job, timeout=60)
        except Exception as exc:  # noqa: BLE001 - said by the test
            failed["error"] = repr(exc)
        finally:
            cluster.run("scontrol", "update", f"NodeName={cluster.node}", "State=RESUME", check=False)

    watcher = threading.Thread(target=fail_the_node, daemon=True)
    watcher.start()
    with runner(cluster, tmp_path, matrix) as r:
        result = r.run(max_workers=1)
        output = result.stdout + result.stderr
    watcher.join(timeout=5)
    assert "error" not in failed, failed["error"]
    first = failed["record"]
    assert (first["JobState"], first["Requeue"], first["Restarts"]) == ("NODE_FAIL", "0", "0"), first  # not rerun by Slurm
    assert result.status == "successful", output[-4000:]
    (train,) = list(Run(result.run.pathspec)["train"])
    assert train.current_attempt == 1
    df = result.run["join"].task["results"].data
    (row,) = df.itertuples()
    assert (row.outcome, row.job_status) == ("ok", "COMPLETED")
    assert int(row.job_id) > int(first["JobId"])
    assert f"slurm {first['JobId']}: NODE_FAIL" in output
    assert cluster.jobs() == []
