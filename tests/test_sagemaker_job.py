"""compute: sagemaker without AWS: matrix rules, job names and plans, the container's view of
its host, request checks against botocore's service model, and what a job's end means."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import re

import pytest
import yaml

from steps import REPO_ROOT
from steps.flow.sagemaker import job as jobs
from steps.flow.sagemaker.entry import Host, at_channels
from steps.flow.sagemaker.outcome import job_result, refused_result
from steps.flow.sagemaker.service_model import request_problems
from steps.plan.matrix import expand, load_matrix, parse_matrix
from steps.plan.schema import CellSpec, ConfigError
from steps.results.metrics import CellMetrics, LossPoint

NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
STUDY = {half: REPO_ROOT / "configs" / "matrix" / f"study1-sagemaker-{half}.yaml" for half in ("p3", "g5")}


def base_matrix(**extra):
    data = yaml.safe_load((REPO_ROOT / "configs/matrix/default.yaml").read_text())
    return {**data, "instance": "g5.xlarge", "compute": "sagemaker", **extra}


def cell(**changes) -> CellSpec:
    spec = {"cell_id": "llama-debug-lora-ddp-1x2-abc", "matrix": "t", "model": "llama-debug", "peft": "lora",
            "strategy": "ddp", "instance": "g5.12xlarge", "gpus": 2, "lr": 1e-3, "micro_batch": 4,
            "seq_len": 64, "train": {"max_steps": 4, "timeout_s": 600}}
    return CellSpec.model_validate({**spec, **changes})


def test_study1_halves_run_on_sagemaker_and_expand():
    for half, path in STUDY.items():
        spec = load_matrix(path)
        assert spec.compute == "sagemaker" and spec.remote.spot and spec.remote.keep_alive_s == 1800
        cells = expand(spec)
        assert len(cells) == 56 and not any(c.refused for c in cells)
        ml = {jobs.sagemaker_instance(c.cell.instance) for c in cells}
        assert ml == {"ml.p3.8xlarge" if half == "p3" else "ml.g5.12xlarge"}


def test_matrix_problems_for_sagemaker_are_reported_together():
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(instance=["local-cpu", "g5.xlarge"],
                                 remote={"max_wait_s": 100, "subnets": ["subnet-1"], "queue": "q"}))
    problems = err.value.problems
    assert problems[0] == "remote.queue: only used by compute 'batch', not 'sagemaker'"
    assert problems[1].startswith("instance: 'local-cpu' is not offered by SageMaker training (no "
                                  "sagemaker_instance in configs/instances.yaml); SageMaker types: p3.2xlarge,")
    assert problems[2:] == ["remote.max_wait_s: only used with remote.spot: true",
                            "remote.subnets / remote.security_groups: a VPC needs both, or neither"]
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(remote={"spot": True, "max_wait_s": 1000}))
    assert err.value.problems == [
        "remote.max_wait_s: 1000 is below the jobs' run limit 2400 s (train.timeout_s + "
        "remote.startup_allowance_s); SageMaker needs at least that"]
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(compute="local", instance="local-cpu", remote={"spot": True, "role": "x"}))
    assert any(p.startswith("remote.role: 'x' is invalid: string should match pattern '^arn:aws")
               for p in err.value.problems)
    # several instance types in one SageMaker run: each cell is its own job
    assert parse_matrix(base_matrix(instance=["g5.xlarge", "p3.2xlarge"])).instance == ["g5.xlarge", "p3.2xlarge"]


def test_job_names_are_valid_short_and_unique_per_attempt():
    long_id = "open-llama-3b-qlora-pipeline-1x4-" + "x" * 60
    names = {jobs.base_job_name("1795282617387096", cid, attempt)
             for cid in ("a", long_id, long_id + "y", "under_score.dot") for attempt in (0, 1)}
    assert len(names) == 8
    for name in names:
        assert len(name) <= jobs.BASE_NAME_MAX and NAME.fullmatch(name), name
        assert NAME.fullmatch(name + "-20261122063000")  # what the SDK appends
    assert jobs.base_job_name("17", "a", 2) == "fm-17-a-" + jobs.base_job_name("17", "a", 2).split("-")[3] + "-a2"


def test_job_plan_of_a_study_cell():
    spec = load_matrix(STUDY["p3"])
    planned = next(c.cell for c in expand(spec) if c.cell.peft == "qlora" and c.cell.strategy == "ddp")
    plan = jobs.plan_job(planned, spec.remote.model_dump(), "r1", 1, "s3://b/fm/", checkpoint_run="r0")
    assert (plan.instance_type, plan.instance_count, plan.processes_per_host) == ("ml.p3.8xlarge", 1, 4)
    assert plan.max_runtime_s == 21600 + 1800 and plan.max_wait_s == 2 * (21600 + 1800) and plan.spot
    assert plan.s3.results == f"s3://b/fm/runs/r1/cells/{planned.cell_id}/attempt-1"
    assert plan.s3.checkpoints == f"s3://b/fm/runs/r0/cells/{planned.cell_id}/checkpoints"
    assert plan.environment["FINETUNE_MATRIX_RESULTS_S3"] == plan.s3.results
    assert plan.tags["finetune-matrix:matrix"] == "study1-sagemaker-p3"
    assert f"transformers=={importlib.metadata.version('transformers')}" in plan.requirements
    assert any(r.startswith("bitsandbytes==") for r in plan.requirements)  # qlora
    assert not any(r.startswith("deepspeed==") for r in plan.requirements)  # ddp
    with pytest.raises(ValueError, match="max_wait_s=100 is below the job's run limit 23400 s"):
        jobs.plan_job(planned, {**spec.remote.model_dump(), "max_wait_s": 100}, "r1", 0, "s3://b")
    with pytest.raises(ValueError, match="'local-cpu' is not offered by SageMaker"):
        jobs.plan_job(cell(instance="local-cpu"), {}, "r", 0, "s3://b")


def test_cost_is_billable_seconds_at_the_sagemaker_price():
    price = jobs.catalog.instances()["g5.12xlarge"].sagemaker_price_per_hour_usd
    assert price and jobs.cost_usd("g5.12xlarge", 1800, 2) == pytest.approx(price)
    assert jobs.cost_usd("local-cpu", 1800, 1) is None


def test_container_sees_its_host_and_channels(tmp_path):
    env = {"SM_HOSTS": '["algo-2", "algo-1"]', "SM_CURRENT_HOST": "algo-2", "SM_MASTER_ADDR": "algo-1",
           "SM_MASTER_PORT": "7777", "SM_NETWORK_INTERFACE_NAME": "eth0",
           "SM_CHANNEL_DATA": "/opt/ml/input/data/data", "SM_CHANNEL_MODEL": "/opt/ml/input/data/model"}
    host = Host.from_env(env)
    assert (host.rank, host.master_addr, host.master_port, host.interface) == (1, "algo-1", 7777, "eth0")
    moved = at_channels(cell(model=str(tmp_path), data={"task": "classification", "path": "/x/sst2"}), env)
    assert moved.data.path == "/opt/ml/input/data/data/sst2"
    assert moved.model == f"/opt/ml/input/data/model/{tmp_path.name}"


def test_request_problems_name_every_rule_botocore_skips():
    problems = request_problems("sagemaker", "CreateTrainingJob", {
        "TrainingJobName": "a_b", "RoleArn": "arn:aws:iam::123456789012:role/R",
        "AlgorithmSpecification": {"TrainingInputMode": "File", "TrainingImage": "i"},
        "OutputDataConfig": {"S3OutputPath": "s3://b/o"},
        "ResourceConfig": {"InstanceType": "ml.p3.9xlarge", "InstanceCount": 1, "VolumeSizeInGB": 30},
        "StoppingCondition": {"MaxRuntimeInSeconds": 60},
        "HyperParameters": {f"h{i}": "v" for i in range(101)},
        "Environment": {"OK": "x" * 513},
        "Tags": [{"Key": "k", "Value": "v"}] * 51,
    })
    assert problems == [
        "CreateTrainingJob.TrainingJobName: 'a_b' does not match the pattern [a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}",
        "CreateTrainingJob.ResourceConfig.InstanceType: 'ml.p3.9xlarge' is not an allowed value; close: "
        "ml.p3.2xlarge, ml.p3.8xlarge, ml.p3.16xlarge, ml.p3dn.24xlarge",
        "CreateTrainingJob.HyperParameters: 101 entries, at most 100 allowed",
        "CreateTrainingJob.Environment['OK']: 513 characters, at most 512 allowed",
        "CreateTrainingJob.Tags: 51 entries, at most 50 allowed",
    ]


def _job(status, secondary, **extra):
    t0 = dt.datetime(2026, 11, 22, 6, 0, tzinfo=dt.timezone.utc)
    return {"TrainingJobName": "fm-r-c-1-a0-20261122060000", "TrainingJobArn": "arn:aws:sagemaker:us-east-1:123456789012:training-job/x",
            "TrainingJobStatus": status, "SecondaryStatus": secondary, "CreationTime": t0,
            "TrainingStartTime": t0 + dt.timedelta(seconds=95), "TrainingTimeInSeconds": 400,
            "BillableTimeInSeconds": 400, "StoppingCondition": {"MaxRuntimeInSeconds": 2400}, **extra}


def _write(folder, **metrics):
    folder.mkdir(parents=True, exist_ok=True)
    CellMetrics(cell_id="c", **metrics).write(folder / "metrics.json")
    (folder / "train.log").write_text(f"log of {folder.name}\n")


def test_what_a_jobs_end_means(tmp_path):
    c = cell()
    points = [LossPoint(step=1, loss=2.0, tokens=10, time_s=1.0)]
    # completed: the trainer's metrics, with the job's name, billing and start-up
    _write(tmp_path / "ok", outcome="ok", loss_curve=points)
    m, log = job_result(c, _job("Completed", "Completed"), tmp_path / "ok")
    assert (m.outcome, m.billable_s, m.queued_s, m.spot_savings, m.job_status) == ("ok", 400.0, 95.0, None, "Completed/Completed")
    assert m.job_name == "fm-r-c-1-a0-20261122060000" and log == "log of ok\n"
    # a failed job brings the trainer's own outcome back (oom, exit code 3)
    _write(tmp_path / "oom", outcome="oom", error="CUDA out of memory", exit_code=3)
    m, _ = job_result(c, _job("Failed", "Failed", FailureReason="oom: CUDA out of memory"), tmp_path / "oom")
    assert (m.outcome, m.error, m.exit_code) == ("oom", "CUDA out of memory", 3)
    # no metrics: capacity failure is an error with the reason
    (tmp_path / "none").mkdir()
    m, log = job_result(c, _job("Failed", "Failed", FailureReason="CapacityError: Unable to provision"), tmp_path / "none")
    assert m.outcome == "error"
    assert m.error == "SageMaker job failed and its metrics.json did not come back: CapacityError: Unable to provision"
    assert log == "(no log came back)\n"
    # MaxRuntimeExceeded is a timeout
    _write(tmp_path / "slow", outcome="running", loss_curve=points)
    m, _ = job_result(c, _job("Stopped", "MaxRuntimeExceeded"), tmp_path / "slow")
    assert (m.outcome, m.stopped_after_steps) == ("timeout", 1)
    assert m.error == "SageMaker stopped the job at MaxRuntimeInSeconds=2400 (1 steps done)"
    # managed spot: billed 120 of 400 s
    m, _ = job_result(c, _job("Completed", "Completed", EnableManagedSpotTraining=True, BillableTimeInSeconds=120),
                      tmp_path / "ok")
    assert m.spot_savings == 0.7
    # node 1 failed while node 0 reported ok
    _write(tmp_path / "ok" / "node1", outcome="error", error="NCCL timeout")
    m, log = job_result(c, _job("Failed", "Failed"), tmp_path / "ok")
    assert (m.outcome, m.error) == ("error", "node 1 failed: NCCL timeout")
    assert log == "log of ok\n\n===== node 1 =====\nlog of node1\n"


def test_refused_job_is_an_error_with_the_reason():
    m = refused_result(cell(), "ResourceLimitExceeded", "The account-level service limit 'ml.g5.12xlarge for "
                       "training job usage' is 0 Instances")
    assert m.outcome == "error" and m.error.startswith(
        "SageMaker job not created (capacity or quota): ResourceLimitExceeded: The account-level")
    assert refused_result(cell(), "AccessDeniedException", "no").error == \
        "SageMaker job not created (refused): AccessDeniedException: no"
