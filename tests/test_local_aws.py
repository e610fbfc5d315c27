"""The local AWS endpoint itself: moto passes through, SageMaker training jobs run on this machine.

Jobs are created with plain boto3, as a SageMaker SDK's ModelTrainer would lay them out: a `code`
channel with the user's script and an `sm_drivers` channel with a shell driver that refers to
`/opt/ml` (so the relocation is exercised). All jobs are submitted at once by one fixture and run
concurrently; each test then looks at its own.
"""

from __future__ import annotations

import io
import json
import math
import os
import tarfile
import time
from datetime import datetime

import pytest
from botocore.exceptions import ClientError

from tests.aws import LocalAWS
from tests.aws import hosts as hosts_module

BUCKET = "local-aws-tests"
ROLE = "arn:aws:iam::123456789012:role/SageMakerTrainingRole"
IMAGE = "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.5.1-gpu-py311"
CAPACITY = (
    "CapacityError: Unable to provision requested ML compute capacity. Please retry using a different ML instance type."
)

TRAIN_PY = """\
import json, os, socket, sys, time
from pathlib import Path

config = Path(os.environ["CONFIG_DIR"])
hp = json.loads((config / "hyperparameters.json").read_text())
rc = json.loads((config / "resourceconfig.json").read_text())
mode, host = hp["mode"], rc["current_host"]
print(f"hello from {host} of {len(rc['hosts'])} in {os.environ['TRAINING_JOB_NAME']}")
print(f"python {os.path.dirname(sys.executable)}")
print(f"channels {sorted(os.listdir(Path(os.environ['CONFIG_DIR']).parent / 'data'))}")
Path(os.environ["OUT"], "x.txt").write_text(f"model from {host}\\n")
Path(os.environ["OUTPUT_DATA"], "metrics.json").write_text('{"loss": 0.5}')
ckpt = Path(os.environ["CKPT"])
if mode == "ok":
    import boto3
    boto3.client("s3").put_object(Bucket=os.environ["BUCKET"], Key=f"from-container/{host}", Body=b"hi")
    (ckpt / f"state-{host}.txt").write_text("step 3")
    for i in range(3):
        print(f"step {i}")
elif mode == "fail" or mode == f"fail-{host}":
    time.sleep(0.3)
    Path(os.environ["FAILURE_FILE"]).write_text("ValueError: the loss is nan at step 3\\n")
    sys.exit(3)
elif mode.startswith("fail-") or mode == "sleep":
    print("sleeping", flush=True)
    time.sleep(60)
elif mode == "hosts":
    peers = {name: socket.gethostbyname(name) for name in rc["hosts"]}
    print("peers " + json.dumps(peers, sort_keys=True))
elif mode == "resume":
    state = ckpt / "progress.txt"
    start = int(state.read_text()) if state.exists() else 0
    if start:
        print(f"resumed from step {start}")
    for step in range(start, 12):
        # Written whole, as a checkpoint should be: the sync may read the file at any moment.
        (ckpt / "progress.tmp").write_text(str(step + 1))
        os.replace(ckpt / "progress.tmp", state)
        print(f"step {step}")
        time.sleep(0.2)
print("done")
"""

RUN_SH = """\
#!/bin/bash
set -e
echo "driver in /opt/ml/input/data/sm_drivers"
cd /opt/ml/input/data/code
exec python train.py
"""


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    with LocalAWS(tmp_path_factory.mktemp("aws")) as local:
        yield local


@pytest.fixture(scope="module")
def s3(aws):
    client = aws.client("s3")
    client.create_bucket(Bucket=BUCKET)
    client.put_object(Bucket=BUCKET, Key="input/code/train.py", Body=TRAIN_PY.encode())
    client.put_object(Bucket=BUCKET, Key="input/code/note.txt", Body=b"user files keep /opt/ml as it is\n")
    client.put_object(Bucket=BUCKET, Key="input/sm_drivers/run.sh", Body=RUN_SH.encode())
    client.put_object(Bucket=BUCKET, Key="input/table/rows.csv", Body=b"a,b\n1,2\n")
    return client


def job_request(name: str, mode: str, *, count: int = 1, max_runtime: int = 60, spot: bool = False) -> dict:
    request = {
        "TrainingJobName": name,
        "RoleArn": ROLE,
        "AlgorithmSpecification": {
            "TrainingImage": IMAGE,
            "TrainingInputMode": "File",
            "ContainerEntrypoint": ["/bin/bash"],
            "ContainerArguments": [
                "-c",
                "chmod +x /opt/ml/input/data/sm_drivers/run.sh && /opt/ml/input/data/sm_drivers/run.sh",
            ],
        },
        "HyperParameters": {"mode": mode},
        "InputDataConfig": [
            _channel("code", f"s3://{BUCKET}/input/code"),
            _channel("sm_drivers", f"s3://{BUCKET}/input/sm_drivers"),
            _channel("table", f"s3://{BUCKET}/input/table/rows.csv"),
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{BUCKET}/output/"},
        "ResourceConfig": {
            "InstanceType": "ml.g5.xlarge",
            "InstanceCount": count,
            "VolumeSizeInGB": 30,
            "KeepAlivePeriodInSeconds": 60,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": max_runtime},
        "Environment": {
            "OUT": "/opt/ml/model",
            "OUTPUT_DATA": "/opt/ml/output/data",
            "CONFIG_DIR": "/opt/ml/input/config",
            "FAILURE_FILE": "/opt/ml/output/failure",
            "CKPT": "/opt/ml/checkpoints",
            "BUCKET": BUCKET,
        },
        "CheckpointConfig": {"S3Uri": f"s3://{BUCKET}/checkpoints/{name}"},
    }
    if spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_runtime * 2
    return request


def _channel(name: str, uri: str) -> dict:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": uri, "S3DataDistributionType": "FullyReplicated"}
        },
    }


@pytest.fixture(scope="module")
def jobs(aws, s3):
    """Every job of this module, created at once (they run concurrently); name -> first Describe."""
    sm = aws.client("sagemaker")
    first = {}
    requests = {
        "ok": job_request("ok", "ok"),
        "fails": job_request("fails", "fail"),
        "too-long": job_request("too-long", "sleep", max_runtime=2),
        "stopped": job_request("stopped", "sleep"),
        "spot": job_request("spot", "resume", spot=True),
    }
    if LocalAWS.multi_host_supported():
        requests["two-hosts"] = job_request("two-hosts", "hosts", count=2)
        requests["host-2-fails"] = job_request("host-2-fails", "fail-algo-2", count=2)
    for name, request in requests.items():
        if name == "spot":
            aws.training.interrupt_next(0.5, once_written="progress.txt")
        sm.create_training_job(**request)
        first[name] = sm.describe_training_job(TrainingJobName=name)
    return first


def _events(aws, job: str) -> list[str]:
    logs = aws.client("logs")
    streams = logs.describe_log_streams(logGroupName="/aws/sagemaker/TrainingJobs", logStreamNamePrefix=f"{job}/")
    messages = []
    for stream in streams["logStreams"]:
        events = logs.get_log_events(
            logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream["logStreamName"], startFromHead=True
        )
        messages += [event["message"] for event in events["events"]]
    return messages


def _tar(s3, key: str) -> dict[str, str]:
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def _statuses(description: dict) -> list[str]:
    return [t["Status"] for t in description["SecondaryStatusTransitions"]]


def test_moto_passes_through(aws, s3):
    s3.put_object(Bucket=BUCKET, Key="plain/object.txt", Body=b"plain")
    assert s3.get_object(Bucket=BUCKET, Key="plain/object.txt")["Body"].read() == b"plain"
    assert aws.client("sts").get_caller_identity()["Account"] == aws.account_id
    assert aws.client("iam").create_role(RoleName="r", AssumeRolePolicyDocument="{}")["Role"]["RoleName"] == "r"
    assert aws.client("sagemaker").list_models()["Models"] == []  # SageMaker beyond training: moto's
    assert ("ListModels", {}) in aws.training.requests
    env = aws.client_env()
    assert env["AWS_ENDPOINT_URL"] == env["METAFLOW_S3_ENDPOINT_URL"] == aws.url
    assert env["AWS_EC2_METADATA_DISABLED"] == "true" and env["AWS_DEFAULT_REGION"] == aws.region


def test_completed_job(aws, s3, jobs):
    assert jobs["ok"]["TrainingJobStatus"] == "InProgress"
    aws.training.wait("ok", 30)
    description = aws.client("sagemaker").describe_training_job(TrainingJobName="ok")  # typed by botocore
    assert description["TrainingJobStatus"] == "Completed", description.get("FailureReason")
    assert _statuses(description) == ["Starting", "Downloading", "Training", "Uploading", "Completed"]
    for key in ("CreationTime", "TrainingStartTime", "TrainingEndTime", "LastModifiedTime"):
        assert isinstance(description[key], datetime), key
    assert description["TrainingStartTime"] <= description["TrainingEndTime"]
    assert description["TrainingTimeInSeconds"] >= 1
    assert description["BillableTimeInSeconds"] == description["TrainingTimeInSeconds"]
    assert description["WarmPoolStatus"] == {"Status": "Available"}
    assert description["TrainingJobArn"] == "arn:aws:sagemaker:us-east-1:123456789012:training-job/ok"
    assert description["HyperParameters"] == {"mode": "ok"}
    assert description["ResourceConfig"]["InstanceType"] == "ml.g5.xlarge"
    assert description["Environment"]["OUT"] == "/opt/ml/model"  # echoed as sent, not relocated
    artifacts = description["ModelArtifacts"]["S3ModelArtifacts"]
    assert artifacts == f"s3://{BUCKET}/output/ok/output/model.tar.gz"

    assert _tar(s3, "output/ok/output/model.tar.gz") == {"x.txt": "model from algo-1\n"}
    assert _tar(s3, "output/ok/output/output.tar.gz") == {"metrics.json": '{"loss": 0.5}'}
    checkpoint = s3.get_object(Bucket=BUCKET, Key="checkpoints/ok/state-algo-1.txt")["Body"].read()
    assert checkpoint == b"step 3"
    assert s3.get_object(Bucket=BUCKET, Key="from-container/algo-1")["Body"].read() == b"hi"

    record = aws.training.jobs["ok"]
    root = record.host_roots[0]
    assert root == aws.workdir / "jobs" / "ok" / "algo-1" and record.exit_codes == {"algo-1": 0}
    assert json.loads((root / "input/config/resourceconfig.json").read_text())["current_host"] == "algo-1"
    assert json.loads((root / "input/config/inputdataconfig.json").read_text())["code"] == {
        "TrainingInputMode": "File",
        "S3DistributionType": "FullyReplicated",
        "RecordWrapperType": "None",
    }
    assert (root / "input/data/table/rows.csv").read_text() == "a,b\n1,2\n"  # a one-object prefix
    driver = (root / "input/data/sm_drivers/run.sh").read_text()
    assert "/opt/ml" not in driver and f"cd {root}/input/data/code" in driver
    assert "/opt/ml" in (root / "input/data/code/note.txt").read_text()  # user channels untouched

    lines = _events(aws, "ok")
    assert lines == [line for line in aws.training.logs["ok"] if line.strip()]
    assert f"driver in {root}/input/data/sm_drivers" in lines
    assert "hello from algo-1 of 1 in ok" in lines
    assert f"python {os.path.dirname(aws.python)}" in lines
    assert "channels ['code', 'sm_drivers', 'table']" in lines
    assert lines[-3:] == ["step 1", "step 2", "done"]
    assert ("CreateTrainingJob", job_request("ok", "ok")) in aws.training.requests
    listed = aws.client("sagemaker").list_training_jobs(NameContains="ok", StatusEquals="Completed")
    assert [s["TrainingJobName"] for s in listed["TrainingJobSummaries"]] == ["ok"]


def test_failed_job_reports_the_failure_file(aws, s3, jobs):
    description = aws.training.wait("fails", 30)
    assert (description["TrainingJobStatus"], description["SecondaryStatus"]) == ("Failed", "Failed")
    assert description["FailureReason"] == "ValueError: the loss is nan at step 3"
    assert aws.training.jobs["fails"].exit_codes == {"algo-1": 3}
    assert _tar(s3, "output/fails/output/model.tar.gz") == {"x.txt": "model from algo-1\n"}


def test_max_runtime_stops_the_job(aws, jobs):
    description = aws.training.wait("too-long", 30)
    assert (description["TrainingJobStatus"], description["SecondaryStatus"]) == ("Stopped", "MaxRuntimeExceeded")
    assert description["FailureReason"].startswith("Training job reached the maximum runtime")
    assert 2 <= description["TrainingTimeInSeconds"] <= 10
    assert aws.training.jobs["too-long"].exit_codes["algo-1"] < 0  # terminated


def test_stop_training_job(aws, jobs):
    sm = aws.client("sagemaker")
    deadline = time.time() + 20
    while "sleeping" not in aws.training.logs["stopped"] and time.time() < deadline:
        time.sleep(0.05)
    sm.stop_training_job(TrainingJobName="stopped")
    assert sm.describe_training_job(TrainingJobName="stopped")["TrainingJobStatus"] in ("Stopping", "Stopped")
    description = aws.training.wait("stopped", 30)
    assert (description["TrainingJobStatus"], description["SecondaryStatus"]) == ("Stopped", "Stopped")
    assert "Stopping" in _statuses(description)
    assert aws.training.stop_calls.count("stopped") == 1
    assert aws.training.jobs["stopped"].exit_codes["algo-1"] < 0
    with pytest.raises(ClientError) as error:
        sm.stop_training_job(TrainingJobName="stopped")
    assert error.value.response["Error"]["Code"] == "ValidationException"


def test_spot_interruption_resumes_from_the_checkpoint(aws, jobs):
    aws.training.wait("spot", 30)
    description = aws.client("sagemaker").describe_training_job(TrainingJobName="spot")
    assert description["TrainingJobStatus"] == "Completed", description.get("FailureReason")
    statuses = _statuses(description)
    assert statuses[statuses.index("Interrupted") :] == [
        "Interrupted",
        "Starting",
        "Downloading",
        "Training",
        "Uploading",
        "Completed",
    ]
    record = aws.training.jobs["spot"]
    assert record.interruptions == 1 and len(record.attempts) == 2
    assert record.host_roots == [aws.workdir / "jobs" / "spot" / "restart-1" / "algo-1"]
    resumed = [line for line in aws.training.logs["spot"] if line.startswith("resumed from step")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) > 0
    assert len(record.log_streams) == 2
    seconds = (description["TrainingEndTime"] - description["TrainingStartTime"]).total_seconds()
    assert description["TrainingTimeInSeconds"] == math.ceil(seconds)
    assert description["BillableTimeInSeconds"] == max(1, math.ceil(seconds * (1 - 0.7)))


def test_two_hosts_reach_each_other(aws, jobs):
    if not LocalAWS.multi_host_supported():
        pytest.skip("algo-1/algo-2 do not resolve and /etc/hosts is not writable")
    description = aws.training.wait("two-hosts", 30)
    assert description["TrainingJobStatus"] == "Completed", description.get("FailureReason")
    record = aws.training.jobs["two-hosts"]
    assert record.exit_codes == {"algo-1": 0, "algo-2": 0}
    for index, root in enumerate(record.host_roots):
        config = json.loads((root / "input/config/resourceconfig.json").read_text())
        assert config["current_host"] == f"algo-{index + 1}" and config["hosts"] == ["algo-1", "algo-2"]
    lines = aws.training.logs["two-hosts"]
    assert {"hello from algo-1 of 2 in two-hosts", "hello from algo-2 of 2 in two-hosts"} <= set(lines)
    assert lines.count('peers {"algo-1": "127.0.0.1", "algo-2": "127.0.0.1"}') == 2
    assert sorted(s.split("/")[1].rsplit("-", 1)[0] for s in record.log_streams) == ["algo-1", "algo-2"]


def test_one_host_failing_ends_the_others(aws, jobs):
    if not LocalAWS.multi_host_supported():
        pytest.skip("algo-1/algo-2 do not resolve and /etc/hosts is not writable")
    description = aws.training.wait("host-2-fails", 30)
    assert description["TrainingJobStatus"] == "Failed"
    assert description["FailureReason"] == "ValueError: the loss is nan at step 3"  # algo-2's failure file
    codes = aws.training.jobs["host-2-fails"].exit_codes
    assert codes["algo-2"] == 3 and codes["algo-1"] < 0


def test_refused_and_capacity_failures(aws, jobs):
    sm = aws.client("sagemaker")
    aws.training.refuse_next("ResourceLimitExceeded", "The account-level service limit for ml.g5.xlarge is 0")
    with pytest.raises(ClientError) as error:
        sm.create_training_job(**job_request("capacity", "ok"))
    assert error.value.response["Error"]["Code"] == "ResourceLimitExceeded"
    assert "capacity" not in aws.training.jobs

    aws.training.fail_next(CAPACITY)
    sm.create_training_job(**job_request("capacity", "ok"))
    description = aws.training.wait("capacity", 10)
    assert (description["TrainingJobStatus"], description["SecondaryStatus"]) == ("Failed", "Failed")
    assert description["FailureReason"] == CAPACITY and "TrainingStartTime" not in description

    with pytest.raises(ClientError) as error:
        sm.create_training_job(**job_request("capacity", "ok"))
    assert error.value.response["Error"]["Code"] == "ResourceInUse"


def test_invalid_request_lists_every_problem(aws):
    request = job_request("a_b", "ok")
    request["ResourceConfig"]["InstanceType"] = "ml.p3.9xlarge"
    with pytest.raises(ClientError) as error:
        aws.client("sagemaker").create_training_job(**request)
    assert error.value.response["Error"]["Code"] == "ValidationException"
    message = error.value.response["Error"]["Message"]
    assert message.startswith("2 validation errors detected")
    assert "TrainingJobName: 'a_b'" in message and "InstanceType: 'ml.p3.9xlarge'" in message
    assert "a_b" not in aws.training.jobs
    with pytest.raises(ClientError) as error:
        aws.client("sagemaker").describe_training_job(TrainingJobName="never-created")
    assert error.value.response["Error"]["Message"] == "Requested resource not found."


def test_hosts_file_lines_are_removed_exactly(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n# keep me\n")
    monkeypatch.setattr(hosts_module, "resolvable", lambda names: hosts_module.MARK in hosts.read_text())
    edit = hosts_module.HostsFile(hosts)
    assert edit.ensure(3) is None
    assert hosts.read_text().splitlines()[-1] == f"127.0.0.1 algo-1 algo-2 algo-3  {hosts_module.MARK}"
    assert edit.ensure(3) is None and len(edit.added) == 1  # resolves now: nothing more appended
    edit.restore()
    assert hosts.read_text() == "127.0.0.1 localhost\n# keep me\n"


def test_iam_role_checks_of_the_sagemaker_sdk(aws):
    """The SDK checks an execution role with SimulatePrincipalPolicy (moto lacks it) and its trust policy."""
    iam = aws.client("iam")
    arn = aws.create_role("TrainingRole")
    trust = iam.get_role(RoleName="TrainingRole")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "sagemaker.amazonaws.com"}
    actions = [f"sagemaker:Action{i}" for i in range(12)]
    results = iam.simulate_principal_policy(PolicySourceArn=arn, ActionNames=actions)["EvaluationResults"]
    assert [(r["EvalActionName"], r["EvalDecision"]) for r in results] == [(a, "allowed") for a in actions]
    with pytest.raises(ClientError) as error:
        iam.simulate_principal_policy(PolicySourceArn=arn.replace("TrainingRole", "Missing"), ActionNames=actions)
    assert error.value.response["Error"]["Code"] == "NoSuchEntity"
    assert aws.create_role("TrainingRole") == arn  # idempotent
