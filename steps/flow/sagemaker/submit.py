"""Run one cell as a SageMaker training job: submit, follow, stop, bring the outputs back.

The SageMaker SDK (v3, `ModelTrainer`) does what it is for: uploading the code and local
inputs, the training image for the region and torch version, assembling and creating the job.
boto3 does the rest, where the SDK falls short for a flow step:
- following: `TrainingJob.wait()` blocks until the end; the step must print status changes
  and log lines as they come, and stop the job when the step itself is stopped;
- the account of the default bucket: the SDK asks STS at its fixed regional endpoint, ignoring
  `AWS_ENDPOINT_URL` (so it cannot be pointed at a test endpoint or a VPC endpoint);
- the cell's results: plain S3 objects under the cell's results prefix.
Every CreateTrainingJob request is checked against botocore's service model before it is sent
(`service_model.request_problems`), also what the client does not check.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from steps import REPO_ROOT
from steps.flow import launcher
from steps.flow.compute import package_files
from steps.flow.jobs import stop_job_on_exit
from steps.flow.sagemaker import job as jobs
from steps.flow.sagemaker.outcome import TERMINAL, job_result, refused_result
from steps.flow.sagemaker.service_model import request_problems
from steps.plan.credentials import redact
from steps.plan.schema import CellSpec
from steps.results.metrics import CellMetrics

LOG_GROUP = "/aws/sagemaker/TrainingJobs"
SDK_MAJOR = 3  # the sagemaker SDK major version this module is written against
ROLE_ENV = ("FINETUNE_MATRIX_SAGEMAKER_ROLE", "SAGEMAKER_ROLE")


class RequestRefused(ValueError):
    """A request AWS would refuse, caught before it is sent (every problem listed)."""


def check_sdk() -> None:
    version = importlib.metadata.version("sagemaker")
    if int(version.split(".")[0]) != SDK_MAJOR:
        raise RuntimeError(f"compute: sagemaker is built on the sagemaker SDK {SDK_MAJOR}.x "
                           f"(ModelTrainer); {version} is installed")


def boto_session(region: str | None):
    import boto3

    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise ValueError("no AWS region: set remote.region in the matrix, or AWS_REGION / a profile")
    return session


def default_prefix(session) -> str:
    """s3://sagemaker-<region>-<account>/finetune-matrix, the SDK's default bucket (created
    if missing, as the SDK does)."""
    account = session.client("sts").get_caller_identity()["Account"]
    bucket = f"sagemaker-{session.region_name}-{account}"
    s3 = session.client("s3")
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception:  # noqa: BLE001 - missing (or not visible): create it like the SDK
        kwargs = ({} if session.region_name == "us-east-1" else
                  {"CreateBucketConfiguration": {"LocationConstraint": session.region_name}})
        s3.create_bucket(Bucket=bucket, **kwargs)
    return f"s3://{bucket}/{jobs.DEFAULT_PREFIX}"


def resolve_role(plan: jobs.JobPlan) -> str | None:
    """remote.role, else the environment; None lets the SDK resolve it (its config file, the
    caller's own role in a SageMaker notebook)."""
    return plan.role or next((os.environ[v] for v in ROLE_ENV if os.environ.get(v)), None)


def torch_version() -> str:
    try:
        return importlib.metadata.version("torch").split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return "2.4.0"


def training_image(plan: jobs.JobPlan, region: str) -> str:
    """remote.image, else AWS's PyTorch training image of the installed torch version, or the
    newest one released before it (the image's torch runs the job; the log says which)."""
    if plan.image:
        return plan.image
    from sagemaker.core import image_uris

    config = image_uris.config_for_framework("pytorch")["training"]
    key = lambda v: tuple(int(p) for p in v.split(".")[:2])  # noqa: E731
    mine = key(torch_version())
    # The major.minor alias ("2.10"): AWS's floating tag, patched images included.
    version = max((v for v in config["version_aliases"] if key(v) <= mine), key=key)
    py = config["versions"][config["version_aliases"][version]]["py_versions"][-1]
    return image_uris.retrieve("pytorch", region=region, version=version, py_version=py,
                               instance_type=plan.instance_type, image_scope="training")


def stage_source(cell: CellSpec, plan: jobs.JobPlan, folder: Path, root: Path = REPO_ROOT) -> Path:
    """The code channel: what Metaflow's code package ships (steps/, configs/), the cell,
    pinned requirements."""
    for path, name in package_files(root):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    launcher.write_cell(cell, folder)
    (folder / "requirements.txt").write_text("".join(f"{line}\n" for line in plan.requirements))
    return folder


def model_trainer(cell: CellSpec, plan: jobs.JobPlan, session, source_dir: Path):
    """The SDK's ModelTrainer for the job (nothing is uploaded or created yet)."""
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import (
        CheckpointConfig,
        Compute,
        InputData,
        Networking,
        OutputDataConfig,
        SourceCode,
        StoppingCondition,
    )

    bucket, prefix = jobs.split_s3(plan.s3.output)
    sm_session = Session(boto_session=session, default_bucket=bucket, default_bucket_prefix=prefix)
    networking = (Networking(subnets=plan.subnets, security_group_ids=plan.security_groups)
                  if plan.subnets else None)
    trainer = ModelTrainer(
        sagemaker_session=sm_session,
        role=resolve_role(plan),
        base_job_name=plan.base_name,
        training_image=training_image(plan, session.region_name),
        source_code=SourceCode(source_dir=str(source_dir), command=jobs.COMMAND,
                               requirements="requirements.txt" if plan.requirements else None),
        compute=Compute(instance_type=plan.instance_type, instance_count=plan.instance_count,
                        volume_size_in_gb=plan.volume_gb, enable_managed_spot_training=plan.spot or None,
                        keep_alive_period_in_seconds=plan.keep_alive_s or None),
        networking=networking,
        stopping_condition=StoppingCondition(max_runtime_in_seconds=plan.max_runtime_s,
                                             max_wait_time_in_seconds=plan.max_wait_s),
        checkpoint_config=CheckpointConfig(s3_uri=plan.s3.checkpoints, local_path=jobs.CHECKPOINT_LOCAL),
        output_data_config=OutputDataConfig(s3_output_path=plan.s3.output),
        environment=plan.environment,
        tags=[{"key": k, "value": v} for k, v in plan.tags.items()],
    )
    trainer.input_data_config = [InputData(channel_name=name, data_source=path)
                                 for name, path in plan.inputs.items()] or None
    return trainer


def request(trainer) -> dict[str, Any]:
    """The CreateTrainingJob request the SDK would send (it uploads the code to build it)."""
    return trainer._create_training_job_args(boto3=True)


def refuse_bad_requests(session) -> None:
    """Check every CreateTrainingJob of this session against the service model first."""

    def check(params, **_):
        if problems := request_problems("sagemaker", "CreateTrainingJob", params):
            raise RequestRefused("CreateTrainingJob would be refused:\n  - " + "\n  - ".join(problems))

    session.events.register("provide-client-params.sagemaker.CreateTrainingJob", check,
                            unique_id="finetune-matrix-check")


def _print(*parts: Any) -> None:
    print(*parts, flush=True)


class LogTail:
    """The job's CloudWatch log lines, each stream (one per instance) from where it was left."""

    def __init__(self, logs, job: str, hosts: int):
        self.logs, self.job, self.hosts, self.tokens = logs, job, hosts, {}

    def poll(self, echo=_print) -> int:
        lines = 0
        try:
            streams = self.logs.describe_log_streams(
                logGroupName=LOG_GROUP, logStreamNamePrefix=f"{self.job}/")["logStreams"]
        except self.logs.exceptions.ResourceNotFoundException:
            return 0
        for stream in streams:
            name = stream["logStreamName"]
            host = name.split("/", 1)[1].rsplit("-", 1)[0]
            while True:
                kwargs = {"nextToken": self.tokens[name]} if name in self.tokens else {"startFromHead": True}
                page = self.logs.get_log_events(logGroupName=LOG_GROUP, logStreamName=name, **kwargs)
                for event in page["events"]:
                    echo(redact(f"[{host}] {event['message']}" if self.hosts > 1 else event["message"]))
                    lines += 1
                same = page.get("nextForwardToken") == self.tokens.get(name)
                self.tokens[name] = page.get("nextForwardToken")
                if same or not page["events"]:
                    break
        return lines


def follow(client, logs, job: str, hosts: int, poll_s: float, echo=_print) -> dict[str, Any]:
    """Status and secondary status changes, and the job's log, until it ends."""
    tail, seen, described = LogTail(logs, job, hosts), None, {}
    while True:
        described = client.describe_training_job(TrainingJobName=job)
        state = (described["TrainingJobStatus"], described.get("SecondaryStatus"))
        if state != seen:
            message = (described.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
            echo(f"sagemaker {job}: {state[0]} / {state[1]}" + (f": {message}" if message else ""))
            seen = state
        tail.poll(echo)
        if state[0] in TERMINAL:
            tail.poll(echo)
            return described
        time.sleep(poll_s)


def stop(client, job: str, echo=_print) -> None:
    """Stop the job unless it has ended (a paid job is never left behind by a dead step)."""
    with contextlib.suppress(Exception):
        status = client.describe_training_job(TrainingJobName=job)["TrainingJobStatus"]
        if status not in TERMINAL and status != "Stopping":
            client.stop_training_job(TrainingJobName=job)
            echo(f"sagemaker {job}: stop requested (the step ended before the job)")


def _objects(s3, uri: str):
    """(bucket, key, key below the prefix) of every object under an s3:// prefix."""
    bucket, prefix = jobs.split_s3(uri)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            yield bucket, obj["Key"], obj["Key"][len(prefix) + 1:]


def fetch(s3, uri: str, out_dir: Path) -> list[Path]:
    """Everything under the cell's results prefix into the local cell folder."""
    got = []
    for bucket, key, rel in _objects(s3, uri):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
        got.append(target)
    return got


def clear(s3, uri: str) -> None:
    """A previous execution of the same attempt's results (so nothing stale comes back)."""
    found = list(_objects(s3, uri))
    for start in range(0, len(found), 1000):  # DeleteObjects takes 1000 keys at most
        batch = found[start:start + 1000]
        s3.delete_objects(Bucket=batch[0][0], Delete={"Objects": [{"Key": key} for _, key, _ in batch]})


def run_cell(cell: CellSpec, out_dir: Path, remote: dict[str, Any], run_id: str, attempt: int,
             checkpoint_run: str | None = None, echo=_print) -> tuple[CellMetrics, str]:
    """One attempt of a cell as a SageMaker training job; its metrics and its log, with the
    cell folder filled as a local cell's (metrics.json, train.log, adapter/, node<i>/)."""
    check_sdk()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    session = boto_session(remote.get("region"))
    prefix = remote.get("s3_prefix") or default_prefix(session)
    plan = jobs.plan_job(cell, remote, run_id, attempt, prefix, checkpoint_run)
    client, s3, logs = session.client("sagemaker"), session.client("s3"), session.client("logs")
    clear(s3, plan.s3.results)
    refuse_bad_requests(session)
    holder: dict[str, str] = {}
    # SIGKILL cannot be stopped: MaxRuntimeInSeconds then bounds what the job can cost
    with tempfile.TemporaryDirectory(prefix="fm-sagemaker-") as tmp, \
            stop_job_on_exit(holder, "name", lambda job: stop(client, job)):
        trainer = model_trainer(cell, plan, session, stage_source(cell, plan, Path(tmp)))
        echo(f"sagemaker: {cell.cell_id} as {plan.instance_count} x {plan.instance_type}, image "
             f"{trainer.training_image}" + (" (spot)" if plan.spot else ""))
        try:
            trainer.train(wait=False, logs=False)
        except RequestRefused as exc:
            return refused_result(cell, "request", str(exc)), str(exc)
        except Exception as exc:  # noqa: BLE001 - ClientError: capacity, quota, access
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
            return refused_result(cell, code, str(exc)), str(exc)
        holder["name"] = name = trainer._latest_training_job.training_job_name
        echo(f"sagemaker: created {name}; results {plan.s3.results}")
        described = follow(client, logs, name, plan.instance_count, float(remote.get("poll_s", 15)), echo)
    holder.clear()
    fetch(s3, plan.s3.results, out_dir)
    m, log = job_result(cell, described, out_dir)
    m.update(cost_usd=jobs.cost_usd(cell.instance, m.billable_s, plan.instance_count), out_dir=str(out_dir))
    m.write(out_dir / "metrics.json")
    return m, log

