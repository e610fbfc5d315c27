"""compute: sagemaker against a real local AWS endpoint (moto server + the training-job
emulator of tests/aws), with the real sagemaker SDK and boto3 talking HTTP to it.

moto runs no container: the emulator runs the job's own command (ContainerEntrypoint and
arguments from the request the SDK built) under the layout SageMaker gives a container
(/opt/ml relocated, resourceconfig.json, SM_* variables from the SDK's own driver scripts).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
import yaml

from steps.flow import launcher
from steps.flow.sagemaker import job as jobs
from steps.flow.sagemaker import submit
from steps.flow.sagemaker.service_model import request_problems
from steps.plan.matrix import expand, load_matrix
from tests.aws.endpoint import LocalAWS
from tests.conftest import REPO, interrupt, make_cell
from tests.test_flow import FLOW

ROLE = "arn:aws:iam::123456789012:role/finetune-matrix-tests"
BUCKET = "fm-tests"


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """The endpoint, and this process's AWS clients pointed at it (restored afterwards)."""
    with LocalAWS(tmp_path_factory.mktemp("aws")) as endpoint:
        saved = {k: os.environ.get(k) for k in endpoint.client_env()}
        os.environ.update(endpoint.client_env())
        boto3.setup_default_session()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        assert endpoint.create_role("finetune-matrix-tests") == ROLE  # the SDK checks it
        yield endpoint
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        boto3.setup_default_session()


def remote(**extra) -> dict:
    return {"role": ROLE, "region": "us-east-1", "s3_prefix": f"s3://{BUCKET}/fm", "poll_s": 0.5,
            "volume_gb": 30, "keep_alive_s": 0, "spot": False, "startup_allowance_s": 600,
            "subnets": [], "security_groups": [], "tags": {}, **extra}


@pytest.mark.slow  # each request uploads the code (about 4 s)
def test_study_requests_validate_against_the_service_model(aws, tmp_path):
    """Both halves of study 1, as the SDK would send them: every method x strategy, spread over
    the two halves (each request uploads the code, so not all 112 cells)."""
    for half, shapes in (("p3", [("lora", "single"), ("qlora", "ddp"), ("lora", "pipeline")]),
                         ("g5", [("qlora", "single"), ("lora", "ddp"), ("qlora", "pipeline")])):
        spec = load_matrix(REPO / f"configs/matrix/study1-sagemaker-{half}.yaml")
        picked = {}
        for planned in expand(spec):
            picked.setdefault((planned.cell.peft, planned.cell.strategy), planned.cell)
        for cell in (picked[shape] for shape in shapes):
            plan = jobs.plan_job(cell, {**spec.remote.model_dump(), "role": ROLE}, "1795282617387096", 0,
                                 f"s3://{BUCKET}/fm")
            session = submit.boto_session("us-east-1")
            staged = submit.stage_source(cell, plan, tmp_path / cell.cell_id)
            request = submit.request(submit.model_trainer(cell, plan, session, staged))
            assert request_problems("sagemaker", "CreateTrainingJob", request) == []
            assert request["ResourceConfig"] == {
                "InstanceType": plan.instance_type, "InstanceCount": 1, "VolumeSizeInGB": 200,
                "KeepAlivePeriodInSeconds": 1800}
            assert request["EnableManagedSpotTraining"] is True
            assert request["StoppingCondition"] == {"MaxRuntimeInSeconds": 23400, "MaxWaitTimeInSeconds": 46800}
            assert request["AlgorithmSpecification"]["TrainingImage"] == (
                "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.10-gpu-py313")
            assert request["CheckpointConfig"] == {"S3Uri": plan.s3.checkpoints, "LocalPath": "/opt/ml/checkpoints"}
            assert request["Environment"] == plan.environment
            assert {"Key": "finetune-matrix:cell", "Value": cell.cell_id} in request["Tags"]
            assert request["TrainingJobName"].startswith(plan.base_name + "-")
            assert (staged / "cell.yaml").is_file() and (staged / "steps/flow/sagemaker/entry.py").is_file()


def _losses(m) -> list[float]:
    return [p.loss for p in m.loss_curve]


def ddp_cell(nodes: int, gpus: int):
    return make_cell(strategy="ddp", nodes=nodes, gpus=gpus, instance="g5.12xlarge",
                     train={"max_steps": 4, "checkpoint_every": 2, "timeout_s": 180})


@pytest.fixture(scope="module")
def local_ddp(tmp_path_factory):
    """The 2-process DDP cell launched here (2 x 1 on two nodes trains the same numbers)."""
    m = launcher.run_cell(ddp_cell(1, 2), tmp_path_factory.mktemp("local"), echo=False)
    assert m.outcome == "ok", m.error
    return m


@pytest.mark.slow
@pytest.mark.parametrize("nodes,gpus", [(1, 2), (2, 1)], ids=["1host-x-2proc", "2hosts-x-1proc"])
def test_job_command_trains_as_the_local_cell(aws, local_ddp, tmp_path, nodes, gpus):
    """The job's exact command and environment, run under the container layout, gives the
    metrics and losses of the same cell launched here."""
    if nodes > 1 and not aws.multi_host_supported():
        pytest.skip("algo-1/algo-2 cannot be made to resolve here (/etc/hosts not writable)")
    cell, local = ddp_cell(nodes, gpus), local_ddp
    lines: list[str] = []
    m, log = submit.run_cell(cell, tmp_path / "job", remote(), "r1", 0, echo=lines.append)
    assert m.outcome == "ok", (m.error, "\n".join(lines[-40:]))
    assert _losses(m) == pytest.approx(_losses(local), abs=1e-5) and len(_losses(m)) == 4
    assert m.val_loss == pytest.approx(local.val_loss, abs=1e-5)
    assert m.world_size == 2 and m.job_name.startswith(jobs.base_job_name("r1", cell.cell_id, 0))
    assert m.billable_s >= 1 and m.cost_usd == pytest.approx(jobs.cost_usd("g5.12xlarge", m.billable_s, nodes))
    job = aws.training.jobs[m.job_name]
    # what ran is what the request said, on every host
    assert job.request["AlgorithmSpecification"]["ContainerArguments"][-1].endswith("sm_train.sh")
    assert job.exit_codes == {f"algo-{i + 1}": 0 for i in range(nodes)}
    # the cell folder as a local cell has it
    assert (tmp_path / "job" / "metrics.json").is_file() and "[default0]" in log
    assert (tmp_path / "job" / "adapter" / "adapter_config.json").is_file()
    if nodes > 1:
        assert (tmp_path / "job" / "node1" / "train.log").is_file()
    # progress reached the step's log: status changes and the job's own lines
    assert any("InProgress / Training" in line for line in lines)
    assert any("finetune-matrix: outcome ok" in line for line in lines)
    # checkpoints went to the cell's checkpoint prefix
    checkpoints = jobs.S3Layout.of(f"s3://{BUCKET}/fm", "r1", cell.cell_id, 0).checkpoints
    bucket, _, prefix = checkpoints.removeprefix("s3://").partition("/")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert any("step_0000002" in k for k in keys)


@pytest.mark.slow
def test_spot_interruption_continues_from_the_checkpoint(aws, tmp_path):
    # the emulator freezes the job as soon as the step-2 checkpoint is written, so the
    # interruption comes before the end on any machine
    cell = make_cell(instance="g5.xlarge", seq_len=256, micro_batch=8,
                     train={"max_steps": 24, "checkpoint_every": 2})
    aws.training.interrupt_next(after_s=0.1, once_written="step_0000002/complete")
    m, _ = submit.run_cell(cell, tmp_path / "job", remote(spot=True), "r2", 0, echo=lambda *_: None)
    assert m.outcome == "ok", m.error
    assert aws.training.jobs[m.job_name].interruptions == 1
    assert m.resumed_from_step and m.resumed_from_step >= 2
    assert m.spot_savings == pytest.approx(0.7, abs=0.2)


def test_capacity_refusal_is_an_error_with_the_reason(aws, tmp_path):
    aws.training.refuse_next("ResourceLimitExceeded", "The account-level service limit 'ml.g5.xlarge for "
                             "training job usage' is 0 Instances")
    m, _ = submit.run_cell(make_cell(instance="g5.xlarge"), tmp_path, remote(), "r3", 0, echo=lambda *_: None)
    assert m.outcome == "error"
    assert m.error.startswith("SageMaker job not created (capacity or quota): ResourceLimitExceeded: ")


def test_a_bad_request_is_refused_before_it_is_sent(aws, tmp_path):
    before = len(aws.training.requests)
    m, _ = submit.run_cell(make_cell(instance="g5.xlarge"), tmp_path, remote(tags={"x" * 129: "v"}), "r4", 0,
                           echo=lambda *_: None)
    assert m.outcome == "error" and "CreateTrainingJob would be refused" in m.error
    assert "Tags[3].Key: 129 characters, at most 128 allowed" in m.error
    assert len(aws.training.requests) == before  # nothing reached the endpoint


# ---- the whole flow ---------------------------------------------------------------------------

def flow_env(aws, tmp_path) -> dict[str, str]:
    """The flow on Metaflow's S3 datastore, on the same endpoint."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="fm-metaflow")
    return {**os.environ, **aws.client_env(),
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DATASTORE_SYSROOT_S3": "s3://fm-metaflow/metaflow",
            "METAFLOW_CARD_S3ROOT": "s3://fm-metaflow/cards",
            "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports"),
            "FINETUNE_MATRIX_SAGEMAKER_ROLE": ROLE}


def sagemaker_matrix(tmp_path, **extra) -> Path:
    matrix = {
        "name": "sagemaker-flow", "models": "llama-debug", "peft": "lora", "strategy": "single",
        "instance": "g5.xlarge", "lr": 3e-3, "micro_batch": [2, 4], "seq_len": 32,
        "train": {"max_steps": 4, "timing_warmup_steps": 1, "timeout_s": 300},
        "data": {"train_samples": 128, "val_samples": 16},
        "include": [{"micro_batch": 2, "train": {"fault": {"kind": "oom", "at_step": 2}}}],
        "compute": "sagemaker",
        "remote": {"region": "us-east-1", "s3_prefix": f"s3://{BUCKET}/flow", "poll_s": 0.5,
                   "volume_gb": 30, "startup_allowance_s": 600},
        **extra,
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return path


@pytest.mark.slow
def test_flow_runs_every_cell_as_a_job_on_the_s3_datastore(aws, tmp_path):
    path = sagemaker_matrix(tmp_path)
    proc = subprocess.run([sys.executable, FLOW, "--config", "matrix", str(path), "run", "--max-workers", "2"],
                          cwd=tmp_path, env=flow_env(aws, tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    run_dir = next(p for p in (tmp_path / "reports").iterdir() if (p / "results.parquet").is_file())
    df = pd.read_parquet(run_dir / "results.parquet")
    assert sorted(df.outcome) == ["ok", "oom"]
    sm = boto3.client("sagemaker")
    for row in df.itertuples():
        job = sm.describe_training_job(TrainingJobName=row.job_name)
        assert row.job_arn == job["TrainingJobArn"] and row.job_arn.endswith(f"training-job/{row.job_name}")
        assert row.billable_s == job["BillableTimeInSeconds"] >= 1
        assert row.cost_usd == pytest.approx(jobs.cost_usd("g5.xlarge", row.billable_s, 1))
        assert job["TrainingJobStatus"] == ("Failed" if row.outcome == "oom" else "Completed")
        assert (run_dir / "cells" / row.cell_id / "metrics.json").is_file()
    oom = df[df.outcome == "oom"].iloc[0]
    assert oom.exit_code == 3
    assert sm.describe_training_job(TrainingJobName=oom.job_name)["FailureReason"].startswith("oom: ")
    assert (run_dir / "report.md").is_file() and "sagemaker-flow" in (run_dir / "report.md").read_text()
    # the run's artifacts are in Metaflow's S3 datastore, readable with the Client API
    reader = ("from metaflow import Flow, namespace; namespace(None); r = Flow('FinetuneMatrixFlow').latest_run;"
              "import json; print(json.dumps(sorted(m['job_name'] for m in (t.data.metrics for t in r['gather']))))")
    out = subprocess.run([sys.executable, "-c", reader], cwd=tmp_path, env=flow_env(aws, tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == sorted(df.job_name), out.stderr[-2000:]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket="fm-metaflow").get("Contents", [])]
    assert any(k.startswith("metaflow/FinetuneMatrixFlow/") for k in keys)


@pytest.mark.slow
def test_interrupted_step_stops_its_job(aws, tmp_path):
    path = sagemaker_matrix(tmp_path, micro_batch=4, include=[],
                            train={"max_steps": 100000, "timeout_s": 300, "hang_after_s": 300})
    before = set(aws.training.jobs)
    # The flow's output goes to a file: it echoes the job's log, which fills a pipe nobody reads
    # in seconds, and a flow blocked writing to it cannot act on Ctrl-C.
    log = tmp_path / "flow.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, FLOW, "--config", "matrix", str(path), "run"], cwd=tmp_path,
                                env=flow_env(aws, tmp_path), stdout=out, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        deadline, name = time.time() + 240, None
        while time.time() < deadline and name is None:
            running = [n for n, j in list(aws.training.jobs.items())
                       if n not in before and j.secondary == "Training"]
            name = running[0] if running else None
            time.sleep(0.5)
        assert name, f"no job reached Training: {log.read_text()[-3000:]}"
        interrupt(proc, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert name in aws.training.stop_calls
    assert aws.training.wait(name, timeout=30)["TrainingJobStatus"] == "Stopped"
