"""compute: batch for real: the flow's cells in containers, through the AWS Batch API.

moto's server (S3, Batch, IAM, EC2, logs) and podman's Docker API service run inside a network
namespace this module makes (tests/engines/netns.py, tests/engines/batch.py); so does the flow,
with Metaflow configured for S3 and Batch against moto and no user configuration. Each cell's
`train` step is a Batch job: Metaflow submits it, moto runs it as a container of the project's CPU
image (tests/engines/image.py, built from a local Debian base without any registry), the task
downloads Metaflow's code package from moto's S3 and trains there. Nothing leaves loopback: the
first test shows that the metadata address and public addresses are unreachable inside (it needs
root, `ip` and `nsenter` only, and runs with `make test`); the others are marked `containers`
(`make test-containers`, which builds the image first).

The flow's `train` step is `@parallel`, so Metaflow submits every cell, even of one node, as a
multi-node Batch job with its command in `nodeOverrides`; tests/engines/batch.py completes moto
there (and with the variables AWS Batch sets in a job's container). With local metadata (no
Metaflow service here), the train step's live card cannot render in the container ("Card render
failed ... Task does not exist", three or four times per cell): noise in the log, seconds per cell.

The instance is g5.12xlarge (4 GPUs): @batch asks for 4 GPUs, which moto does not pass to the
container engine (it passes only image, command, environment and mounts), so the request costs
nothing here; in the container the cell finds no GPU and trains on the CPU, as a GPU instance type
that finds no GPU does everywhere. The same matrix on `local-cpu` is the reference run.

Not run here: cells of several nodes (`nodes: 2`). Tried (2 x 1-process DDP on g5.12xlarge,
Metaflow 2.19.39, moto 5.2.5): node 1's container exits at once, node 0 waits for it for ever
("Waiting for batch secondary tasks to finish"). Two causes, either enough:
- Metaflow builds the other nodes' command by replacing the control task's id in node 0's
  command with `ID-node-$AWS_BATCH_JOB_NODE_INDEX`, as text; with local metadata task ids are
  small integers, so task 3 turns `boto3` and `s3://` into `boto3-node-$AWS_BATCH_JOB_NODE_INDEX`
  and the node cannot even download the code package (the same on AWS; an open fix:
  Netflix/metaflow pull request 2574). Node 0 also waits for the other nodes' tasks through the
  metadata provider, which local metadata does not share.
- moto gives the other nodes AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS from the main node's
  container's network settings, which are empty under the host network moto's containers need
  here to reach moto (the variable is set, to "").
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import REPO, interrupt
from tests.engines import batch as local_batch
from tests.engines import netns, podman

FLOW = str(REPO / "flows" / "finetune_matrix.py")
INSTANCE = "g5.12xlarge"
# Losses (validation, and every step's) of a cell in its container and of the same cell here: the
# same code, torch build (2.13.0+cpu in both), seeds and data order, fp32. What may differ is the
# number of threads a rank's matrix products use (the launcher gives a rank of a cloud instance all
# the container's cores, a local-cpu rank its one core), which changes the order of fp32 sums: a
# rounding difference, far below 1e-5 on losses near 5 after 4 steps. Measured on a 2-core machine:
# equal to the last bit (difference 0.0) for all four cells.
LOSS_TOLERANCE = 1e-5

GRID = {
    "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"], "gpus": 2,
    "lr": [3e-3, 1e-2], "micro_batch": 4, "seq_len": 32, "precision": "fp32",
    "train": {"max_steps": 4, "timing_warmup_steps": 1, "timeout_s": 300},
    "data": {"train_samples": 64, "val_samples": 16},
    "retries": 1,
}


def remote_matrix(image: str, **extra) -> dict:
    return {"name": "batch-e2e", **GRID, "instance": INSTANCE, "compute": "batch",
            "remote": {"queue": local_batch.QUEUE, "image": image}, **extra}


def local_matrix() -> dict:
    return {"name": "batch-e2e", **GRID, "instance": "local-cpu"}


# ---- the namespace ------------------------------------------------------------------------------

def test_nothing_outside_loopback_is_reachable_inside_the_namespace():
    """The metadata address and public addresses fail at once ("Network is unreachable": there is
    no route), from this process's thread inside and from a process started inside; loopback works."""
    why = netns.missing()
    if why:
        pytest.skip(why)
    probe = ("import json, sys; from tests.engines.netns import connect_error; "
             "print(json.dumps([connect_error(h, int(p)) for h, p in (a.split(':') for a in sys.argv[1:])]))")
    targets = ["169.254.169.254:80", "1.1.1.1:443", "8.8.8.8:53"]
    with netns.NetNS() as ns:
        for host_port in targets:
            host, port = host_port.split(":")
            error, seconds = ns.call(netns.connect_error, host, int(port))
            assert error == "ENETUNREACH" and seconds < 0.5, (host_port, error, seconds)
        proc = ns.run([sys.executable, "-c", probe, *targets], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert [e for e, _ in json.loads(proc.stdout)] == ["ENETUNREACH"] * 3
        # loopback is up: a listener inside answers
        listener = ns.popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                             "s.bind(('127.0.0.1', 47113)); s.listen(); print('up', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "up"
        assert ns.call(netns.connect_error, "127.0.0.1", 47113)[0] is None
        path = ns.path
    assert listener.poll() is not None and not path.exists()  # stopped by its id, namespace deleted


# ---- the engines and the image -------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_image():
    """The project's CPU image (tests/engines/image.py: built once, from a local Debian base)."""
    from tests.engines import image

    why = local_batch.missing()
    if why:
        pytest.skip(why)
    return image.built()  # built before the tests (`make test-containers`), never by them


@pytest.fixture(scope="module")
def engines(tmp_path_factory, cpu_image):
    why = local_batch.missing()
    if why:
        pytest.skip(why)
    with netns.NetNS() as ns, local_batch.LocalBatch(ns, tmp_path_factory.mktemp("batch-engines")) as batch:
        yield batch


class Flow:
    """The flow's command line, run inside the namespace with Metaflow on moto's S3 and Batch;
    runs of one `Flow` share a working folder (local metadata: `resume` finds the run there)."""

    def __init__(self, engines: local_batch.LocalBatch, root: Path):
        self.engines, self.root = engines, Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.reports = self.root / "reports"
        self.runs = 0
        self.env = {**os.environ, **engines.metaflow_env(self.root / "metaflow-home"),
                    "FINETUNE_MATRIX_REPORTS": str(self.reports)}

    def write(self, matrix: dict, name: str = "matrix.yaml") -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(matrix))
        return path

    def command(self, *args: str) -> list[str]:
        return self.engines.ns.command([sys.executable, FLOW, *args])

    def run(self, *args: str, timeout: float = 900) -> tuple[int, str, str]:
        """(exit code, output, run id)."""
        proc = subprocess.run(self.command(*args), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        output = proc.stdout + proc.stderr
        self.runs += 1
        (self.root / f"flow-{self.runs}.log").write_text(output)  # for whoever reads a failure
        return proc.returncode, output, run_id(output)

    def results(self, run: str) -> pd.DataFrame:
        return pd.read_parquet(self.reports / run / "results.parquet")


def run_id(output: str) -> str:
    found = re.findall(r"Workflow starting \(run-id (\d+)\)", output)
    assert found, output[-3000:]
    return found[0]


def train_containers(engines: local_batch.LocalBatch, run: str) -> list[str]:
    """Names of the containers podman started for the run's `train` tasks (its jobs are named
    USER-FLOW-RUN-STEP-TASK-ATTEMPT, moto names a container JOBNAME-JOBID)."""
    return [e["Name"] for e in engines.containers("start") if f"-FinetuneMatrixFlow-{run}-" in e["Name"]]


def attempts(names: list[str], run: str) -> dict[str, list[int]]:
    """task id -> the attempts whose containers started, from the containers' names."""
    found: dict[str, list[int]] = {}
    for name in names:
        step, task, attempt = re.search(rf"-{run}-(\w+)-(\d+)-(\d+)-", name).groups()
        assert step == "train", name  # no other step runs in a container
        found.setdefault(task, []).append(int(attempt))
    return {task: sorted(a) for task, a in found.items()}


def batch_jobs(engines: local_batch.LocalBatch, run: str) -> list[dict]:
    jobs = engines.jobs(("SUCCEEDED", "FAILED", *local_batch.UNFINISHED))
    ids = [j["jobId"] for js in jobs.values() for j in js if f"-FinetuneMatrixFlow-{run}-" in j["jobName"]]
    return engines.describe(ids)


def job_log(engines: local_batch.LocalBatch, job: dict) -> str:
    events = engines.aws("logs", "get_log_events", logGroupName="/aws/batch/job",
                         logStreamName=job["container"]["logStreamName"], startFromHead=True)["events"]
    return "\n".join(e["message"] for e in events)


# ---- the matrix in containers and here ------------------------------------------------------------

def _local_flow(root: Path) -> subprocess.Popen:
    """The same matrix on this machine (local datastore, no namespace needed: it sends nothing),
    the reference run; started beside the Batch run, whose tasks spend much of their time waiting."""
    path = root / "matrix.yaml"
    path.write_text(yaml.safe_dump(local_matrix()))
    env = {**os.environ, "FINETUNE_MATRIX_REPORTS": str(root / "reports")}
    with (root / "flow.log").open("w") as log:
        return subprocess.Popen([sys.executable, FLOW, "--config", "matrix", str(path), "run", "--max-workers", "4"],
                                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def runs(engines, cpu_image, tmp_path_factory):
    """The matrix through Batch (in containers) and here, at the same time; each run's table,
    folder and seconds."""
    local_root = tmp_path_factory.mktemp("batch-local")
    flow = Flow(engines, tmp_path_factory.mktemp("batch-flow"))
    path = flow.write(remote_matrix(cpu_image))
    started = time.monotonic()
    local = _local_flow(local_root)
    try:
        code, output, run = flow.run("--config", "matrix", str(path), "run", "--max-workers", "4")
        batch_s = time.monotonic() - started
        local.wait(timeout=900)
    finally:
        netns.stop(local)
    assert code == 0, output[-6000:]
    local_output = (local_root / "flow.log").read_text()
    assert local.returncode == 0, local_output[-4000:]
    local_run = run_id(local_output)
    return {"batch": {"run": run, "df": flow.results(run), "dir": flow.reports / run, "seconds": batch_s},
            "local": {"run": local_run, "df": pd.read_parquet(local_root / "reports" / local_run / "results.parquet"),
                      "dir": local_root / "reports" / local_run},
            "seconds": time.monotonic() - started}


def _key(row) -> tuple:
    return (row.strategy, float(row.lr))


@pytest.mark.slow
@pytest.mark.containers
def test_a_container_in_the_namespace_cannot_reach_the_metadata_address(engines, cpu_image):
    """What the jobs' containers run in: the namespace's network (moto runs them with the host's)."""
    probe = ("import socket\ntry:\n socket.create_connection(('169.254.169.254', 80), timeout=3)\n"
             "except OSError as e:\n print(e.errno)")
    proc = engines.ns.run(["podman", "run", "--rm", "--network=host", "--label", podman.LABEL, cpu_image, "python", "-c", probe],
                          env=engines.podman_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "101", proc.stdout + proc.stderr  # ENETUNREACH


@pytest.mark.slow
@pytest.mark.containers
def test_every_cell_trains_in_a_container_and_matches_the_local_run(engines, runs):
    batch, local = runs["batch"], runs["local"]
    df, ref, run = batch["df"], local["df"], batch["run"]
    print(f"Batch run {batch['seconds']:.0f} s; with the local run beside it {runs['seconds']:.0f} s")
    assert len(df) == 4 and set(df["outcome"]) == {"ok"}, df[["cell_id", "outcome", "error"]]
    assert set(df["instance"]) == {INSTANCE} and sorted(df["world_size"]) == [1, 1, 2, 2]

    # one container per cell, each the train task's only attempt, all removed once finished
    names = train_containers(engines, run)
    assert len(names) == len(df) and all(a == [0] for a in attempts(names, run).values()), names
    assert engines.existing_containers() == []
    jobs = batch_jobs(engines, run)
    assert sorted(j["status"] for j in jobs) == ["SUCCEEDED"] * 4
    for job in jobs:  # a multi-node job of one node: the train step is @parallel
        (node,) = job["nodeProperties"]["nodeRangeProperties"]
        env = {e["name"]: e["value"] for e in node["container"]["environment"]}
        assert env["AWS_BATCH_JOB_NUM_NODES"] == "1" and env["AWS_BATCH_JQ_NAME"] == local_batch.QUEUE
        # the instance's 4 GPUs were asked for (moto passes no device request to the engine)
        assert {"type": "GPU", "value": "4"} in node["container"]["resourceRequirements"]
        assert env["METAFLOW_CODE_URL"].startswith(f"s3://{local_batch.BUCKET}/metaflow/FinetuneMatrixFlow/data/")
        log = job_log(engines, job)  # the task in the container: Metaflow's code package, then the cell
        assert "Code package downloaded." in log and "Task is starting." in log
        assert "[default0]:step 4/4 loss" in log, log[-2000:]
    # the trainer wrote into the container's folder; the task brought it back into this run's folder
    assert all(d.startswith("/home/") and f"/{run}/cells/" in d for d in df["out_dir"])
    for cell_id in df["cell_id"]:
        folder = batch["dir"] / "cells" / cell_id
        assert sorted(p.name for p in folder.iterdir()) == ["adapter", "cell.yaml", "metrics.json", "train.log"]
        assert sorted(p.name for p in (folder / "adapter").iterdir()) == [
            "README.md", "adapter_config.json", "adapter_model.safetensors"]  # PEFT's folder
        assert "[default0]:step 4/4 loss" in (folder / "train.log").read_text()

    # the same table and report as the run here, and the same losses
    assert list(df.columns) == list(ref.columns)
    mine = {_key(r): r for r in df.itertuples()}
    theirs = {_key(r): r for r in ref.itertuples()}
    assert sorted(mine) == sorted(theirs)
    for key, row in mine.items():
        assert math.isfinite(row.val_loss)
        assert row.val_loss == pytest.approx(theirs[key].val_loss, abs=LOSS_TOLERANCE), key
        assert _losses(row) == pytest.approx(_losses(theirs[key]), abs=LOSS_TOLERANCE) and len(_losses(row)) == 4
    report, ref_report = (batch["dir"] / "report.md").read_text(), (local["dir"] / "report.md").read_text()
    assert _headings(report) == _headings(ref_report)
    assert _table_header(report, "## Results") == _table_header(ref_report, "## Results")
    assert all(cid in report for cid in df["cell_id"])


def _losses(row) -> list[float]:
    return [p["loss"] for p in json.loads(row.loss_curve)]


def _headings(report: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith("## ")]


def _table_header(report: str, section: str) -> str:
    body = report.split(section, 1)[1]
    return next(line for line in body.splitlines() if line.startswith("| "))


# ---- a failing container: retried, the run fails, resume re-runs it alone ------------------------------

def save_model(folder: Path, weights: bool = True) -> None:
    """A small Llama saved as a Hugging Face folder; without `weights` its weights file is not one
    (a download cut short): its config reads, so `start`'s checks let it through, and the trainer
    fails on it (as in tests/test_flow_failures.py)."""
    from tests.test_flow_failures import save_model as save

    save(folder, weights=weights)


def build_model_image(engines: local_batch.LocalBatch, base: str, model: Path, tag: str) -> None:
    """`base` with the model folder at the same path as here (where `start` reads its config)."""
    context = model.parent / "model-image"
    context.mkdir(exist_ok=True)
    (context / "Containerfile").write_text(f"FROM {base}\nCOPY model {model}\n")
    shutil.rmtree(context / "model", ignore_errors=True)
    shutil.copytree(model, context / "model")
    for path in (context / "model").iterdir():  # readable by the image's user, whatever this umask made
        path.chmod(0o644)
    podman.podman("build", "--network=none", "-t", tag, str(context), conf=engines.conf, timeout=300)


@pytest.mark.slow
@pytest.mark.containers
def test_a_failing_container_is_retried_fails_the_run_and_resume_reruns_it_alone(engines, cpu_image, tmp_path):
    flow = Flow(engines, tmp_path / "flow")
    model = tmp_path / "model"
    save_model(model, weights=False)
    tag = f"localhost/fm-test-model-image:{os.getpid()}-{int(time.time())}"
    build_model_image(engines, cpu_image, model, tag)
    try:
        matrix = remote_matrix(tag, name="batch-retry", models=["llama-debug", str(model)], strategy="single",
                               lr=3e-3)
        path = flow.write(matrix)
        # One task at a time, the good cell first: Metaflow's runtime stops the tasks running beside
        # the one whose last attempt fails (their jobs are terminated), which would re-run them too.
        code, output, first = flow.run("--config", "matrix", str(path), "run", "--max-workers", "1")
        assert code != 0, output[-4000:]
        tries = attempts(train_containers(engines, first), first)
        assert sorted(tries.values()) == [[0], [0, 1]], tries  # the good cell once, the broken one twice
        jobs = batch_jobs(engines, first)
        assert sorted(j["status"] for j in jobs) == ["FAILED", "FAILED", "SUCCEEDED"]
        failed = [j for j in jobs if j["status"] == "FAILED"]
        assert all("Error while deserializing header" in job_log(engines, j) for j in failed)
        assert not (flow.reports / first / "results.parquet").exists()

        save_model(model)  # the cause, removed: the image rebuilt with a good weights file
        build_model_image(engines, cpu_image, model, tag)
        resumed_at = time.time()
        code, output, second = flow.run("resume", "--origin-run-id", first, "--max-workers", "1")
        assert code == 0, output[-4000:]
        rerun = attempts(train_containers(engines, second), second)
        assert list(rerun.values()) == [[0]], rerun  # one cell ran again, in one container
        (job,) = batch_jobs(engines, second)
        assert job["status"] == "SUCCEEDED"
        df = flow.results(second)
        assert len(df) == 2 and set(df["outcome"]) == {"ok"}
        ran = {row.model: row.started_at > resumed_at for row in df.itertuples()}
        assert ran == {str(model): True, "llama-debug": False}  # that cell was the broken one; the other was cloned
    finally:
        podman.podman("rmi", "-f", tag, conf=engines.conf, check=False)


# ---- an interrupted flow ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.containers
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupted_flow_leaves_no_job_and_no_container(engines, cpu_image, tmp_path, how):
    """Ctrl-C (SIGINT to the flow's process group: the runtime and its tasks' workers) or SIGTERM
    to the runtime alone, while a cell's job runs (its container started): the job is terminated,
    its container removed. (After SIGTERM the runtime is gone at once; the train task's worker stops
    its job when it finds the runtime gone, on its next log line.)"""
    flow = Flow(engines, tmp_path / "flow")
    matrix = remote_matrix(cpu_image, name="batch-interrupt", strategy="single", lr=3e-3,
                           train={**GRID["train"], "max_steps": 100000, "timeout_s": 600})
    path = flow.write(matrix)
    log = tmp_path / "flow.log"
    with log.open("w") as out:  # a file, not a pipe: a flow blocked writing its log cannot act on Ctrl-C
        proc = subprocess.Popen(flow.command("--config", "matrix", str(path), "run"), cwd=flow.root, env=flow.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, running, run = time.monotonic() + 300, [], None
        while time.monotonic() < deadline and not running:  # until its job runs, its container started
            time.sleep(0.5)
            found = re.findall(r"Workflow starting \(run-id (\d+)\)", log.read_text())
            if found and train_containers(engines, found[0]):
                run = found[0]
                running = [j for j in engines.jobs(("RUNNING",))["RUNNING"] if f"-{run}-train-" in j["jobName"]]
        assert running, f"no job ran within 300 s: {log.read_text()[-3000:]}"
        interrupt(proc, log, how)
        left = engines.wait_until_no_job(timeout_s=60)
    finally:
        netns.stop(proc)  # what is left of its process group (nothing, if all went well)
        if engines.terminate_unfinished("the interrupt test ended"):  # not left to fail the next test
            engines.wait_until_no_job(timeout_s=60)
    assert not any(left.values()), left  # nothing SUBMITTED, PENDING, RUNNABLE, STARTING or RUNNING
    (job,) = batch_jobs(engines, run)
    assert job["status"] == "FAILED" and job["statusReason"] == "Metaflow initiated job termination."
    assert len(train_containers(engines, run)) == 1
    deadline = time.monotonic() + 30
    while engines.existing_containers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert engines.existing_containers() == []
