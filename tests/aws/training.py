"""A SageMaker training service that runs its jobs on this machine.

`TrainingService` answers CreateTrainingJob, DescribeTrainingJob, StopTrainingJob and
ListTrainingJobs (the rest of SageMaker is moto's). A created job runs in a background thread,
the way the real service reports it through DescribeTrainingJob:

    TrainingJobStatus  InProgress -> Completed | Failed | Stopped   (Stopping while stopping)
    SecondaryStatus    Starting -> Downloading -> Training -> Uploading -> Completed
                       (or Failed / Stopping -> Stopped / MaxRuntimeExceeded; Interrupted, then
                       Starting again, for an emulated spot interruption)

Each instance ("host") of a job is a directory standing in for `/opt/ml`,
`<workdir>/<job>/algo-<i>/` (`<workdir>/<job>/restart-<k>/algo-<i>/` after the k-th spot
interruption), with the layout a SageMaker container sees:

    input/config/resourceconfig.json, inputdataconfig.json, hyperparameters.json
    input/data/<channel>/          every InputDataConfig channel, downloaded from S3
    model/  output/data/  output/failure   (what the container writes)
    checkpoints/                   CheckpointConfig.LocalPath (only with a CheckpointConfig)

and runs ContainerEntrypoint + ContainerArguments as a process group, with every `/opt/ml` in
the command, the Environment values, CheckpointConfig.LocalPath and the text files of the
`sm_drivers` channel (the SageMaker SDK's driver scripts, which hard-code `/opt/ml`) replaced by
the host's directory. The training image is not used: the command runs with the interpreter
given to the service first on PATH.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import botocore.session

from steps.flow.sagemaker.service_model import request_problems
from tests.aws.hosts import HostsFile, host_names
from tests.aws.s3io import CheckpointSync, download_prefix, split_s3, upload_tar

OPT_ML = "/opt/ml"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
DRIVERS_CHANNEL = "sm_drivers"  # sagemaker.train.constants.SM_DRIVERS
GROUP_NAME = "homogeneousCluster"
TERMINAL = ("Completed", "Failed", "Stopped")
FAILURE_REASON_MAX = 1024

STATUS_MESSAGES = {
    "Starting": "Preparing the instances for training",
    "Downloading": "Downloading input data",
    "Training": "Training image download completed. Training in progress.",
    "Uploading": "Uploading generated training model",
    "Completed": "Training job completed",
    "Failed": "Training job failed",
    "Stopping": "Stopping the training job",
    "Stopped": "Training job stopped",
    "MaxRuntimeExceeded": "Training job stopped because it reached its maximum runtime",
    "Interrupted": "Training job interrupted: the managed spot instances were reclaimed",
}


def _describe_members() -> frozenset[str]:
    model = botocore.session.get_session().get_service_model("sagemaker")
    described = set(model.operation_model("DescribeTrainingJob").output_shape.members)
    return frozenset(described & set(model.operation_model("CreateTrainingJob").input_shape.members))


# Request members that DescribeTrainingJob reports back as they were sent.
ECHOED = _describe_members()


class ServiceError(Exception):
    """An AWS error response: HTTP `status`, `__type` = code."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def relocate(value: str, root: Path) -> str:
    return value.replace(OPT_ML, str(root))


@dataclass
class Host:
    name: str
    root: Path
    proc: subprocess.Popen | None = None
    stream: str = ""
    pending: list[tuple[int, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    reader: threading.Thread | None = None
    checkpoint: CheckpointSync | None = None


@dataclass
class TrainingJob:
    """One job: the request and everything the emulator knows of it (for DescribeTrainingJob)."""

    name: str
    arn: str
    request: dict[str, Any]
    creation_time: float
    status: str = "InProgress"
    secondary: str = "Starting"
    transitions: list[dict[str, Any]] = field(default_factory=list)
    failure_reason: str | None = None
    last_modified: float = 0.0
    start_time: float | None = None  # TrainingStartTime: the instances started
    end_time: float | None = None  # TrainingEndTime
    model_artifacts: str | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)  # host -> exit code, last attempt
    host_roots: list[Path] = field(default_factory=list)  # last attempt
    attempts: list[list[Path]] = field(default_factory=list)  # host roots of every attempt
    interruptions: int = 0
    log_streams: list[str] = field(default_factory=list)
    checkpoint_syncs: int = 0
    preset_failure: str | None = None
    interrupt_after: float | None = None
    interrupt_glob: str | None = None  # interrupt once such a checkpoint file was written
    stop_requested: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def spot(self) -> bool:
        return bool(self.request.get("EnableManagedSpotTraining"))

    @property
    def training_seconds(self) -> float | None:
        if self.start_time is None or self.end_time is None:
            return None
        return self.end_time - self.start_time


class _Abort(Exception):
    """The job ends before its containers finish: `outcome` is stopped | max_runtime | failed."""

    def __init__(self, outcome: str, reason: str | None = None):
        super().__init__(outcome)
        self.outcome, self.reason = outcome, reason


class TrainingService:
    """The emulated SageMaker training API (see the module docstring).

    Knobs: `refuse_next(code, message)`, `fail_next(reason)`, `interrupt_next(after_s)`,
    `spot_savings` (0.7), `kill_grace_s` (5). Records: `jobs`, `requests` (every SageMaker
    request the endpoint received, emulated or not), `stop_calls`, `logs` (lines per job).
    """

    OPERATIONS = ("CreateTrainingJob", "DescribeTrainingJob", "StopTrainingJob", "ListTrainingJobs")

    def __init__(
        self,
        workdir: Path,
        python: str,
        region: str,
        account_id: str,
        client: Callable[[str], Any],
        client_env: Callable[[], dict[str, str]],
        hosts: HostsFile,
    ):
        self.workdir, self.python, self.region, self.account_id = Path(workdir), python, region, account_id
        self._client, self._client_env, self._hosts = client, client_env, hosts
        self.spot_savings = 0.7
        self.kill_grace_s = 5.0
        self.sync_interval_s = 1.0
        self.log_interval_s = 0.5
        self.jobs: dict[str, TrainingJob] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.stop_calls: list[str] = []
        self.logs: dict[str, list[str]] = {}
        self._lock = threading.RLock()
        self._clients: dict[str, Any] = {}
        self._refuse: tuple[str, str] | None = None
        self._fail: str | None = None
        self._interrupt: float | None = None
        self._interrupt_glob: str | None = None
        self._log_group_ready = False

    # ---- knobs -------------------------------------------------------------------------------

    def refuse_next(self, code: str, message: str) -> None:
        """The next CreateTrainingJob is answered with this error (e.g. ResourceLimitExceeded)."""
        with self._lock:
            self._refuse = (code, message)

    def fail_next(self, reason: str) -> None:
        """The next created job fails without running: SecondaryStatus Failed, FailureReason=reason."""
        with self._lock:
            self._fail = reason

    def interrupt_next(self, after_s: float, once_written: str | None = None) -> None:
        """The next created job is interrupted once, like a reclaimed spot instance, after `after_s`
        seconds of Training (and at least one checkpoint sync; with `once_written`, as soon as a
        container has written a checkpoint file matching that glob: the containers are frozen and
        their checkpoints synced first, so it happens however fast they train), then restarted
        on fresh hosts."""
        with self._lock:
            self._interrupt = after_s
            self._interrupt_glob = once_written

    # ---- helpers for tests -------------------------------------------------------------------

    def wait(self, job: str, timeout: float = 30.0) -> dict[str, Any]:
        """Block until `job` is terminal; its DescribeTrainingJob answer."""
        record = self.jobs[job]
        if not record.done.wait(timeout):
            raise TimeoutError(f"training job {job} still {record.status}/{record.secondary} after {timeout}s")
        return self.describe_training_job({"TrainingJobName": job})

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every running job (processes killed) and wait for the runner threads."""
        self.kill_grace_s = min(self.kill_grace_s, 1.0)
        running = [job for job in self.jobs.values() if not job.done.is_set()]
        for job in running:
            job.stop_requested.set()
        for job in running:
            if job.thread is not None:
                job.thread.join(timeout)

    # ---- the API -----------------------------------------------------------------------------

    def handle(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        handler = {
            "CreateTrainingJob": self.create_training_job,
            "DescribeTrainingJob": self.describe_training_job,
            "StopTrainingJob": self.stop_training_job,
            "ListTrainingJobs": self.list_training_jobs,
        }[operation]
        return handler(params)

    def create_training_job(self, params: dict[str, Any]) -> dict[str, Any]:
        problems = request_problems("sagemaker", "CreateTrainingJob", params)
        if problems:
            count = len(problems)
            raise ServiceError(
                "ValidationException",
                f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(problems),
            )
        name = params["TrainingJobName"]
        arn = f"arn:aws:sagemaker:{self.region}:{self.account_id}:training-job/{name}"
        with self._lock:
            if name in self.jobs:
                raise ServiceError(
                    "ResourceInUse",
                    "Training job names must be unique within an AWS account and region, and a training job "
                    f"with this name already exists ({arn})",
                )
            if self._refuse is not None:
                code, message = self._refuse
                self._refuse = None
                raise ServiceError(code, message)
            now = time.time()
            job = TrainingJob(name=name, arn=arn, request=json.loads(json.dumps(params)), creation_time=now)
            job.preset_failure, self._fail = self._fail, None
            job.interrupt_after, self._interrupt = self._interrupt, None
            job.interrupt_glob, self._interrupt_glob = self._interrupt_glob, None
            self._transition(job, "Starting", now)
            self.jobs[name] = job
            self.logs[name] = []
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"training-{name}", daemon=True)
            job.thread.start()
        return {"TrainingJobArn": arn}

    def describe_training_job(self, params: dict[str, Any]) -> dict[str, Any]:
        job = self._job(params.get("TrainingJobName", ""))
        with self._lock:
            out = {key: value for key, value in job.request.items() if key in ECHOED}
            for flag in (
                "EnableManagedSpotTraining",
                "EnableNetworkIsolation",
                "EnableInterContainerTrafficEncryption",
            ):
                out.setdefault(flag, False)
            out.update(
                TrainingJobName=job.name,
                TrainingJobArn=job.arn,
                TrainingJobStatus=job.status,
                SecondaryStatus=job.secondary,
                CreationTime=job.creation_time,
                LastModifiedTime=job.last_modified,
                SecondaryStatusTransitions=[dict(t) for t in job.transitions],
            )
            if job.failure_reason:
                out["FailureReason"] = job.failure_reason
            if job.start_time is not None:
                out["TrainingStartTime"] = job.start_time
            if job.end_time is not None:
                out["TrainingEndTime"] = job.end_time
            seconds = job.training_seconds
            if seconds is not None:
                out["TrainingTimeInSeconds"] = max(1, math.ceil(seconds))
                out["BillableTimeInSeconds"] = self.billable_seconds(seconds, job.spot)
            if job.model_artifacts:
                out["ModelArtifacts"] = {"S3ModelArtifacts": job.model_artifacts}
            warm = self._warm_pool(job)
            if warm:
                out["WarmPoolStatus"] = warm
            return out

    def stop_training_job(self, params: dict[str, Any]) -> dict[str, Any]:
        job = self._job(params.get("TrainingJobName", ""))
        with self._lock:
            self.stop_calls.append(job.name)
            if job.status in TERMINAL:
                raise ServiceError(
                    "ValidationException",
                    f"The request was rejected because the training job is in status {job.status}.",
                )
            if job.status == "InProgress":
                job.status = "Stopping"
                self._transition(job, "Stopping")
            job.stop_requested.set()
        return {}

    def list_training_jobs(self, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            jobs = list(self.jobs.values())
            name_contains = params.get("NameContains")
            status = params.get("StatusEquals")
            if name_contains:
                jobs = [j for j in jobs if name_contains in j.name]
            if status:
                jobs = [j for j in jobs if j.status == status]
            for key, attr, keep in (
                ("CreationTimeAfter", "creation_time", lambda v, t: v > t),
                ("CreationTimeBefore", "creation_time", lambda v, t: v < t),
                ("LastModifiedTimeAfter", "last_modified", lambda v, t: v > t),
                ("LastModifiedTimeBefore", "last_modified", lambda v, t: v < t),
            ):
                if key in params:
                    bound = float(params[key])
                    jobs = [j for j in jobs if keep(getattr(j, attr), bound)]
            if params.get("WarmPoolStatusEquals"):
                jobs = [j for j in jobs if (self._warm_pool(j) or {}).get("Status") == params["WarmPoolStatusEquals"]]
            sort_by = params.get("SortBy", "CreationTime")
            key = {"Name": lambda j: j.name, "Status": lambda j: j.status}.get(sort_by, lambda j: j.creation_time)
            jobs.sort(key=key, reverse=params.get("SortOrder", "Ascending") == "Descending")
            start = int(params.get("NextToken") or 0)
            limit = int(params.get("MaxResults") or 10)
            page = jobs[start : start + limit]
            summaries = []
            for job in page:
                summary = {
                    "TrainingJobName": job.name,
                    "TrainingJobArn": job.arn,
                    "CreationTime": job.creation_time,
                    "LastModifiedTime": job.last_modified,
                    "TrainingJobStatus": job.status,
                    "SecondaryStatus": job.secondary,
                }
                if job.end_time is not None:
                    summary["TrainingEndTime"] = job.end_time
                warm = self._warm_pool(job)
                if warm:
                    summary["WarmPoolStatus"] = warm
                summaries.append(summary)
            out: dict[str, Any] = {"TrainingJobSummaries": summaries}
            if start + limit < len(jobs):
                out["NextToken"] = str(start + limit)
            return out

    def billable_seconds(self, seconds: float, spot: bool) -> int:
        if spot:
            return max(1, math.ceil(seconds * (1 - self.spot_savings)))
        return max(1, math.ceil(seconds))

    # ---- bookkeeping -------------------------------------------------------------------------

    def _job(self, name: str) -> TrainingJob:
        job = self.jobs.get(name)
        if job is None:
            raise ServiceError("ValidationException", "Requested resource not found.")
        return job

    def _warm_pool(self, job: TrainingJob) -> dict[str, str] | None:
        keep_alive = job.request.get("ResourceConfig", {}).get("KeepAlivePeriodInSeconds") or 0
        if keep_alive > 0 and job.status in TERMINAL and job.start_time is not None:
            return {"Status": "Available"}
        return None

    def _transition(self, job: TrainingJob, status: str, now: float | None = None, message: str | None = None) -> None:
        with self._lock:
            now = time.time() if now is None else now
            if job.transitions and "EndTime" not in job.transitions[-1]:
                job.transitions[-1]["EndTime"] = now
            entry = {"Status": status, "StartTime": now, "StatusMessage": message or STATUS_MESSAGES[status]}
            if status in ("Completed", "Failed", "Stopped", "MaxRuntimeExceeded"):
                entry["EndTime"] = now
            job.transitions.append(entry)
            job.secondary = status
            job.last_modified = now

    def _finish(self, job: TrainingJob, status: str, secondary: str, reason: str | None = None) -> None:
        with self._lock:
            now = time.time()
            if job.start_time is not None:
                job.end_time = now
            if reason:
                job.failure_reason = reason[:FAILURE_REASON_MAX]
            job.status = status
            self._transition(job, secondary, now)

    def _client_for(self, service: str) -> Any:
        with self._lock:
            if service not in self._clients:
                self._clients[service] = self._client(service)
            return self._clients[service]

    # ---- running a job -----------------------------------------------------------------------

    def _run(self, job: TrainingJob) -> None:
        try:
            self._execute(job)
        except Exception as exc:  # the emulator's own bug: say so in the job, not in a dead thread
            self.logs[job.name].extend(traceback.format_exc().splitlines())
            if job.status not in TERMINAL:
                self._finish(job, "Failed", "Failed", f"InternalServerError: local SageMaker emulator: {exc!r}")
        finally:
            job.done.set()

    def _execute(self, job: TrainingJob) -> None:
        if job.preset_failure is not None:
            self._finish(job, "Failed", "Failed", job.preset_failure)
            return
        problem = self._unsupported(job.request)
        count = job.request["ResourceConfig"].get("InstanceCount", 1)
        if problem is None and count > 1:
            problem = self._hosts.ensure(count)
        if problem is not None:
            self._finish(job, "Failed", "Failed", problem)
            return
        max_runtime = job.request.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
        job.start_time = time.time()
        deadline = job.start_time + max_runtime if max_runtime else None
        ran, outcome, reason = False, "completed", None
        try:
            while True:
                hosts = self._prepare(job, count, deadline)
                ran = True
                outcome, reason = self._train(job, hosts, deadline)
                if outcome != "interrupted":
                    break
                job.interruptions += 1
                job.interrupt_after = None
                self._transition(job, "Interrupted")
                self._transition(job, "Starting")
        except _Abort as abort:
            outcome, reason = abort.outcome, abort.reason
        if ran:
            if outcome == "completed":
                self._transition(job, "Uploading")
            try:
                self._upload(job)
            except Exception as exc:
                outcome, reason = "failed", f"ClientError: Data upload failed: {exc}"
        if outcome == "completed":
            self._finish(job, "Completed", "Completed")
        elif outcome == "failed":
            self._finish(job, "Failed", "Failed", reason)
        elif outcome == "stopped":
            self._finish(job, "Stopped", "Stopped")
        else:
            self._finish(
                job,
                "Stopped",
                "MaxRuntimeExceeded",
                f"Training job reached the maximum runtime of {max_runtime} seconds (MaxRuntimeInSeconds) "
                "and was stopped.",
            )

    @staticmethod
    def _unsupported(request: dict[str, Any]) -> str | None:
        spec = request["AlgorithmSpecification"]
        if not spec.get("ContainerEntrypoint"):
            return (
                "ClientError: the local SageMaker emulator runs AlgorithmSpecification.ContainerEntrypoint "
                "(+ ContainerArguments) on this machine; it cannot run a training image's own entrypoint "
                f"({spec.get('TrainingImage') or spec.get('AlgorithmName')})."
            )
        if "InstanceCount" not in request["ResourceConfig"]:
            return "ClientError: the local SageMaker emulator does not run heterogeneous clusters (InstanceGroups)."
        for channel in request.get("InputDataConfig", []):
            source = channel["DataSource"].get("S3DataSource")
            if source is None or source.get("S3DataType", "S3Prefix") != "S3Prefix":
                return (
                    f"ClientError: channel {channel['ChannelName']}: the local SageMaker emulator only "
                    "downloads S3DataSource channels of S3DataType S3Prefix."
                )
        return None

    def _check(self, job: TrainingJob, deadline: float | None) -> None:
        if job.stop_requested.is_set():
            raise _Abort("stopped")
        if deadline is not None and time.time() >= deadline:
            raise _Abort("max_runtime")

    def _prepare(self, job: TrainingJob, count: int, deadline: float | None) -> list[Host]:
        """Downloading: the host directories of one attempt, inputs and checkpoints in place."""
        self._check(job, deadline)
        self._transition(job, "Downloading")
        request = job.request
        base = self.workdir / job.name
        if job.attempts:
            base = base / f"restart-{len(job.attempts)}"
        names = host_names(count)
        hosts = [Host(name=name, root=base / name) for name in names]
        instance_type = request["ResourceConfig"]["InstanceType"]
        mode = request["AlgorithmSpecification"].get("TrainingInputMode", "File")
        channels = request.get("InputDataConfig", [])
        checkpoint = request.get("CheckpointConfig")
        for index, host in enumerate(hosts):
            root = host.root
            if root.exists():
                shutil.rmtree(root)
            for sub in ("input/config", "input/data", "model", "output/data"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            config = root / "input/config"
            config.joinpath("resourceconfig.json").write_text(
                json.dumps(
                    {
                        "current_host": host.name,
                        "current_instance_type": instance_type,
                        "current_group_name": GROUP_NAME,
                        "hosts": names,
                        "instance_groups": [
                            {"instance_group_name": GROUP_NAME, "instance_type": instance_type, "hosts": names}
                        ],
                        "network_interface_name": "lo",
                    }
                )
            )
            input_config = {}
            for channel in channels:
                source = channel["DataSource"]["S3DataSource"]
                entry = {
                    "TrainingInputMode": channel.get("InputMode", mode),
                    "S3DistributionType": source.get("S3DataDistributionType", "FullyReplicated"),
                    "RecordWrapperType": channel.get("RecordWrapperType", "None"),
                }
                if channel.get("ContentType"):
                    entry["ContentType"] = channel["ContentType"]
                input_config[channel["ChannelName"]] = entry
            config.joinpath("inputdataconfig.json").write_text(json.dumps(input_config))
            config.joinpath("hyperparameters.json").write_text(json.dumps(request.get("HyperParameters", {})))
            s3 = self._client_for("s3")
            for channel in channels:
                self._check(job, deadline)
                name, source = channel["ChannelName"], channel["DataSource"]["S3DataSource"]
                shard = (index, count) if source.get("S3DataDistributionType") == "ShardedByS3Key" else None
                dest = root / "input/data" / name
                try:
                    download_prefix(s3, source["S3Uri"], dest, shard)
                except Exception as exc:
                    bucket = split_s3(source["S3Uri"])[0]
                    raise _Abort(
                        "failed",
                        f'ClientError: Data download failed: No S3 objects found under S3 URL "{source["S3Uri"]}" '
                        f"given in input data source ({exc!r}). Please ensure that the bucket {bucket} exists in "
                        f"the selected region ({self.region}) and that objects exist under that S3 prefix.",
                    ) from exc
                if name == DRIVERS_CHANNEL:
                    self._relocate_tree(dest, root)
            if checkpoint:
                local = Path(relocate(checkpoint.get("LocalPath", f"{OPT_ML}/checkpoints"), root))
                local.mkdir(parents=True, exist_ok=True)
                if checkpoint.get("S3Uri"):
                    host.checkpoint = CheckpointSync(s3, local, checkpoint["S3Uri"])
                    host.checkpoint.download()
        with self._lock:
            job.host_roots = [host.root for host in hosts]
            job.attempts.append(list(job.host_roots))
            job.exit_codes = {host.name: None for host in hosts}
        self._check(job, deadline)
        return hosts

    @staticmethod
    def _relocate_tree(directory: Path, root: Path) -> None:
        """Rewrite `/opt/ml` in the text files under `directory` (the SDK's drivers)."""
        for path in directory.rglob("*"):
            if not path.is_file():
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if OPT_ML in text:
                path.write_text(relocate(text, root), encoding="utf-8")

    def _container_env(self, job: TrainingJob, host: Host) -> dict[str, str]:
        env = {
            "PATH": os.pathsep.join([os.path.dirname(self.python), os.environ.get("PATH", "/usr/bin:/bin")]),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            # As in SageMaker's framework images: print() reaches the logs line by line.
            "PYTHONUNBUFFERED": "1",
        }
        env.update({key: relocate(value, host.root) for key, value in job.request.get("Environment", {}).items()})
        env.update(TRAINING_JOB_NAME=job.name, TRAINING_JOB_ARN=job.arn)
        env.update(self._client_env())
        return env

    def _train(self, job: TrainingJob, hosts: list[Host], deadline: float | None) -> tuple[str, str | None]:
        """Training: run the container on every host; (outcome, failure reason)."""
        self._transition(job, "Training")
        began = time.time()
        spec = job.request["AlgorithmSpecification"]
        self._ensure_log_group()
        stop_pumps = threading.Event()
        pumps = [
            threading.Thread(target=self._every, args=(self.log_interval_s, stop_pumps, self._flush_logs, hosts)),
            # an interruption waiting for a checkpoint file: sync often, so it comes right after it
            threading.Thread(target=self._every, args=(
                0.05 if job.interrupt_glob else self.sync_interval_s, stop_pumps, self._sync, job, hosts)),
        ]
        for pump in pumps:
            pump.daemon = True
        outcome, reason, failed_host = "completed", None, None
        try:
            for host in hosts:
                self._open_stream(job, host)
                command = [relocate(part, host.root) for part in spec["ContainerEntrypoint"]]
                command += [relocate(part, host.root) for part in spec.get("ContainerArguments", [])]
                try:
                    host.proc = subprocess.Popen(
                        command,
                        cwd=host.root,
                        env=self._container_env(job, host),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                except OSError as exc:
                    outcome, failed_host = "failed", host
                    reason = f"ClientError: cannot start the container command {command}: {exc}"
                    break
                host.reader = threading.Thread(target=self._read, args=(job, host), daemon=True)
                host.reader.start()
            for pump in pumps:
                pump.start()
            while outcome == "completed":
                if job.stop_requested.is_set():
                    outcome = "stopped"
                elif deadline is not None and time.time() >= deadline:
                    outcome = "max_runtime"
                elif (
                    job.interrupt_after is not None
                    and time.time() - began >= job.interrupt_after
                    and job.interrupt_glob is not None
                    and self._written(hosts, job.interrupt_glob)
                ):
                    # reclaimed right after that checkpoint was written: freeze the containers
                    # (on any machine, however fast, the job cannot finish first), then the sync
                    # that SageMaker's two-minute notice leaves time for
                    for host in hosts:
                        _killpg(host.proc.pid, signal.SIGSTOP)
                    self._sync(job, hosts)
                    outcome = "interrupted"
                elif (
                    job.interrupt_after is not None
                    and job.interrupt_glob is None
                    and time.time() - began >= job.interrupt_after
                    and (job.checkpoint_syncs > 0 or not any(h.checkpoint for h in hosts))
                ):
                    outcome = "interrupted"
                else:
                    codes = [host.proc.poll() for host in hosts]
                    bad = [h for h, code in zip(hosts, codes) if code not in (None, 0)]
                    if bad:
                        outcome, failed_host = "failed", bad[0]
                    elif all(code == 0 for code in codes):
                        break
                    else:
                        time.sleep(0.05)
        finally:
            self._terminate(hosts)
            for host in hosts:
                if host.reader is not None:
                    host.reader.join(5)
            stop_pumps.set()
            for pump in pumps:
                if pump.is_alive():
                    pump.join(30)
            self._flush_logs(hosts)
            self._sync(job, hosts)
            with self._lock:
                job.exit_codes = {host.name: (host.proc.returncode if host.proc else None) for host in hosts}
        if outcome == "failed" and reason is None:
            reason = self._failure_text(hosts) or f"AlgorithmError: ExitCode {failed_host.proc.returncode}"
        return outcome, reason

    def _upload(self, job: TrainingJob) -> None:
        """model/ and output/data/ of every host (merged, algo-1 first) as model.tar.gz and output.tar.gz."""
        prefix = f"{job.request['OutputDataConfig']['S3OutputPath'].rstrip('/')}/{job.name}/output"
        s3 = self._client_for("s3")
        upload_tar(s3, [root / "model" for root in job.host_roots], f"{prefix}/model.tar.gz")
        with self._lock:
            job.model_artifacts = f"{prefix}/model.tar.gz"
        upload_tar(s3, [root / "output/data" for root in job.host_roots], f"{prefix}/output.tar.gz")

    @staticmethod
    def _failure_text(hosts: list[Host]) -> str | None:
        for host in hosts:
            path = host.root / "output/failure"
            if path.is_file():
                text = path.read_text(errors="replace").strip()
                if text:
                    return text
        return None

    def _terminate(self, hosts: list[Host]) -> None:
        """SIGTERM to every running container's process group, SIGKILL after the grace period;
        leftovers of finished containers are killed too (their pipes then close)."""
        running = [h for h in hosts if h.proc is not None and h.proc.poll() is None]
        for host in running:
            _killpg(host.proc.pid, signal.SIGTERM)
            _killpg(host.proc.pid, signal.SIGCONT)  # a frozen (interrupted) container sees it
        end = time.time() + self.kill_grace_s
        while any(h.proc.poll() is None for h in running) and time.time() < end:
            time.sleep(0.05)
        for host in hosts:
            if host.proc is None:
                continue
            _killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait()

    @staticmethod
    def _every(interval: float, stop: threading.Event, fn: Callable[..., Any], *args: Any) -> None:
        while not stop.wait(interval):
            fn(*args)

    @staticmethod
    def _written(hosts: list[Host], pattern: str) -> bool:
        """Whether a container has written a checkpoint file matching `pattern` (its local path)."""
        return any(
            fnmatch.fnmatch(path.relative_to(h.checkpoint.local).as_posix(), pattern)
            for h in hosts if h.checkpoint and h.checkpoint.local.is_dir()
            for path in h.checkpoint.local.rglob("*") if path.is_file()
        )

    def _sync(self, job: TrainingJob, hosts: list[Host]) -> None:
        if not any(host.checkpoint for host in hosts):
            return
        for host in hosts:
            if host.checkpoint is not None:
                try:
                    host.checkpoint.sync()
                except Exception as exc:  # keep syncing; say why in the logs
                    self.logs[job.name].append(f"[emulator] checkpoint sync of {host.name} failed: {exc!r}")
        with self._lock:
            job.checkpoint_syncs += 1

    # ---- logs --------------------------------------------------------------------------------

    def _ensure_log_group(self) -> None:
        with self._lock:
            if self._log_group_ready:
                return
            logs = self._client_for("logs")
            try:
                logs.create_log_group(logGroupName=LOG_GROUP)
            except logs.exceptions.ResourceAlreadyExistsException:
                pass
            self._log_group_ready = True

    def _open_stream(self, job: TrainingJob, host: Host) -> None:
        logs = self._client_for("logs")
        stream = f"{job.name}/{host.name}-{int(time.time())}"
        while stream in job.log_streams:  # a restart within the same second
            stream += "-1"
        try:
            logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
        except logs.exceptions.ResourceAlreadyExistsException:
            pass
        host.stream = stream
        with self._lock:
            job.log_streams.append(stream)

    def _read(self, job: TrainingJob, host: Host) -> None:
        lines = self.logs[job.name]
        for raw in iter(host.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            lines.append(line)
            if line.strip():  # CloudWatch refuses empty messages
                with host.lock:
                    host.pending.append((int(time.time() * 1000), line))
        host.proc.stdout.close()

    def _flush_logs(self, hosts: list[Host]) -> None:
        logs = self._client_for("logs")
        for host in hosts:
            with host.lock:
                events, host.pending = host.pending, []
            for start in range(0, len(events), 200):
                batch = [{"timestamp": ts, "message": message} for ts, message in events[start : start + 200]]
                try:
                    logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=host.stream, logEvents=batch)
                except Exception:  # logs are best effort, as in SageMaker; the lines stay in self.logs
                    pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
