"""A local AWS Batch: moto's server (S3, Batch, IAM, EC2, CloudWatch Logs) and podman's Docker API
service, both started inside a network namespace (tests/engines/netns.py), with a MANAGED
compute environment, a job queue, a bucket for Metaflow's datastore and a role for the jobs.

moto's Batch backend runs each job as a container through the Docker API (`DOCKER_HOST`: here
`podman system service` on a socket), with the host's network (`MOTO_DOCKER_NETWORK_MODE=host`:
the namespace's, where moto listens on loopback), copies the container's output to CloudWatch
Logs and removes the container when the job ends. The image must already be in podman's
storage: moto does not pull it on this path (and nothing could be pulled from the namespace).

moto's server runs here with its Batch backend completed where AWS Batch does more than moto
5.2.5 and Metaflow depends on it (`extend_moto`, in the server's process; moto itself is not
changed):
- SubmitJob's `nodeOverrides`. The flow's `train` step is `@parallel`, so Metaflow submits every
  cell, one node or several, as a multi-node job whose task command is in `nodeOverrides` (the
  job definition's own command is a placeholder, `echo hello world`); moto drops the field and
  runs the placeholder, and the task is never run.
- What AWS Batch sets in a job's container and moto does not: AWS_BATCH_JOB_ATTEMPT,
  AWS_BATCH_CE_NAME, AWS_BATCH_JQ_NAME and AWS_EXECUTION_ENV (Metaflow's task reads them);
  on a multi-node job's nodes AWS_BATCH_JOB_ID (`JOBID#NODE`: moto sets it on single-container
  jobs only, and without it Metaflow's task does not know it runs on Batch and does not hand its
  metadata back), AWS_BATCH_JOB_NODE_INDEX, AWS_BATCH_JOB_NUM_NODES and
  AWS_BATCH_JOB_MAIN_NODE_INDEX; and the job role's credentials (which the ECS agent serves on
  169.254.170.2; here moto's dummy keys).
The containers' /etc/hosts resolves this machine's host name to loopback (`base_hosts_file`):
its own address does not exist in the namespace.
Multi-node jobs of more than one node still do not run here (see tests/test_batch.py's docstring).

podman records every container it starts in its events log (`events_logger = "file"` in this
session's containers.conf): `containers()` reads it, so containers are counted after moto has
removed them.

    with NetNS() as ns, LocalBatch(ns, tmp) as batch:
        subprocess.run(ns.command([python, flow, "run"]), env={**os.environ, **batch.metaflow_env(home)})
        batch.containers("start")
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.engines import podman
from tests.engines.netns import NetNS, stop

REPO = Path(__file__).resolve().parents[2]

REGION = "us-east-1"
ACCESS_KEY = SECRET_KEY = "testing"
COMPUTE_ENVIRONMENT = "fm-test-ce"
QUEUE = "fm-test-queue"
BUCKET = "fm-test-metaflow"
JOB_ROLE = "fm-test-batch-job"
ACCOUNT = "123456789012"  # moto's
UNFINISHED = ("SUBMITTED", "PENDING", "RUNNABLE", "STARTING", "RUNNING")

# What AWS Batch sets in every job's container besides AWS_BATCH_JOB_ID (the one moto sets), for
# a queue with one compute environment. AWS_BATCH_JOB_ATTEMPT is Batch's own attempt of the job:
# Metaflow submits a new job for each of its retries and gives the job no retry strategy, so on
# AWS every Metaflow job runs as attempt 1 (moto has no Batch-level retries either: the first
# attempt); Metaflow's own retry number reaches the task as the step's `--retry-count`.
def agent_env(compute_environment: str, queue: str, attempt: int = 1) -> dict[str, str]:
    return {
        "AWS_BATCH_JOB_ATTEMPT": str(attempt),
        "AWS_BATCH_CE_NAME": compute_environment,
        "AWS_BATCH_JQ_NAME": queue,
        "AWS_EXECUTION_ENV": "AWS_ECS_EC2",
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
    }


def missing() -> str | None:
    """Why a local Batch cannot run here (None: it can)."""
    from tests.engines import netns

    why = netns.missing() or podman.missing()
    if why:
        return why
    for module in ("moto", "docker", "flask"):
        try:
            __import__(module)
        except ImportError:
            return f"the Python package `{module}` is missing (pip install 'moto[server]')"
    return None


class LocalBatch:
    """moto + podman's service in `ns`, their files under `workdir`; the AWS resources made."""

    def __init__(self, ns: NetNS, workdir: Path):
        self.ns = ns
        self.workdir = Path(workdir)
        self.socket = self.workdir / "podman.sock"
        self.events_log = self.workdir / "podman-events.log"
        self.conf = self.workdir / "containers.conf"
        self.port = 0
        self.url = ""
        self.service: podman.Service | None = None
        self.moto_proc: subprocess.Popen | None = None
        self.role_arn = f"arn:aws:iam::{ACCOUNT}:role/{JOB_ROLE}"
        self._session: Any = None

    # ---- lifetime
    def start(self) -> LocalBatch:
        self.workdir.mkdir(parents=True, exist_ok=True)
        podman.write_conf(self.conf, {"events_logger": "file", "events_logfile_path": str(self.events_log)})
        self._resolve_hostname_to_loopback()
        try:
            self._start_podman()
            self._start_moto()
            self.call(self._create_resources)
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self) -> LocalBatch:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _resolve_hostname_to_loopback(self) -> None:
        """The jobs' containers share the namespace's network, where this machine's own address
        does not exist: its host name must resolve to loopback in them (Metaflow's main node of a
        @parallel step on Batch takes its address from its host name; on EC2 that is the
        instance's own address). podman's `base_hosts_file`, instead of this machine's /etc/hosts."""
        hosts = self.workdir / "hosts"
        hosts.write_text(f"127.0.0.1 localhost {socket.gethostname()}\n::1 localhost\n")
        lines = self.conf.read_text().splitlines()
        setting = f"base_hosts_file = {json.dumps(str(hosts))}"
        if "[containers]" in (line.strip() for line in lines):
            at = next(i for i, line in enumerate(lines) if line.strip() == "[containers]") + 1
            lines[at:at] = [setting]
        else:
            lines += ["", "[containers]", setting]
        self.conf.write_text("\n".join(lines) + "\n")

    def podman_env(self) -> dict[str, str]:
        return podman.env(self.conf)

    def _start_podman(self) -> None:
        self.service = podman.Service(self.socket, conf=self.conf, log=self.workdir / "podman-service.log",
                                      popen=self.ns.popen).start()

    def _start_moto(self) -> None:
        self.port = self.ns.call(_free_port)
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ,
               "DOCKER_HOST": f"unix://{self.socket}",
               "MOTO_DOCKER_NETWORK_MODE": "host",
               # moto runs the jobs' containers with the host's network: the namespace's, where
               # it listens (MOTO_HOST/MOTO_PORT are what it tells the containers)
               "MOTO_HOST": "http://127.0.0.1", "MOTO_PORT": str(self.port),
               "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
               "AWS_DEFAULT_REGION": REGION}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        log = open(self.workdir / "moto.log", "w")  # noqa: SIM115
        self.moto_proc = self.ns.popen([sys.executable, "-m", "tests.engines.batch", "-H", "127.0.0.1",
                                        "-p", str(self.port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.moto_proc.poll() is not None:
                raise RuntimeError(f"moto's server exited: {self.log('moto.log')}")
            if self.call(_answers, self.url):
                return
            time.sleep(0.2)
        raise RuntimeError(f"moto's server did not answer within 60 s: {self.log('moto.log')}")

    def close(self) -> None:
        """Stop what runs (jobs first, so moto kills and removes their containers), then moto and
        podman by their process ids; remove any container of this session still there."""
        try:
            if self.moto_proc is not None and self.moto_proc.poll() is None:
                with contextlib.suppress(Exception):
                    self.terminate_unfinished("the test session ended")
                    self.wait_until_no_job(timeout_s=30)
        finally:
            if self.moto_proc is not None:
                stop(self.moto_proc)
            with contextlib.suppress(Exception):
                self.remove_containers()
            if self.service is not None:
                self.service.close()
            self.socket.unlink(missing_ok=True)

    def log(self, name: str, tail: int = 3000) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    # ---- AWS through the namespace
    def client(self, service: str) -> Any:
        """A boto3 client for moto; call it only inside `call` (its sockets must open there)."""
        import boto3
        from botocore.config import Config

        if self._session is None:
            self._session = boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                                                  region_name=REGION)
        return self._session.client(service, endpoint_url=self.url,
                                    config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=60))

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        return self.ns.call(fn, *args, **kwargs)

    def aws(self, service: str, operation: str, **kwargs: Any) -> Any:
        """One AWS request to moto, e.g. aws("batch", "list_jobs", jobQueue=QUEUE)."""
        return self.call(lambda: getattr(self.client(service), operation)(**kwargs))

    def _create_resources(self) -> None:
        """What a Batch queue stands on: a VPC, subnet and security group, an instance profile and
        roles, a MANAGED compute environment (moto's UNMANAGED one fails on its own jobs:
        KeyError 'computeResources'), the queue; and the bucket of Metaflow's datastore."""
        ec2, iam, batch = self.client("ec2"), self.client("iam"), self.client("batch")
        self.client("s3").create_bucket(Bucket=BUCKET)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.0.0/24")["Subnet"]["SubnetId"]
        group = ec2.create_security_group(GroupName="fm-test", Description="fm-test", VpcId=vpc)["GroupId"]
        trust = {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"Service": s}, "Action": "sts:AssumeRole"}
            for s in ("batch.amazonaws.com", "ecs-tasks.amazonaws.com", "ec2.amazonaws.com")]}
        service_role = iam.create_role(RoleName="fm-test-batch-service",
                                       AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
        assert iam.create_role(RoleName=JOB_ROLE, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"] \
            == self.role_arn
        profile = iam.create_instance_profile(InstanceProfileName="fm-test-ecs-instance")["InstanceProfile"]["Arn"]
        ce = batch.create_compute_environment(
            computeEnvironmentName=COMPUTE_ENVIRONMENT, type="MANAGED", state="ENABLED", serviceRole=service_role,
            computeResources={"type": "EC2", "minvCpus": 0, "maxvCpus": 256, "desiredvCpus": 0,
                              "instanceTypes": ["optimal"], "subnets": [subnet], "securityGroupIds": [group],
                              "instanceRole": profile})
        batch.create_job_queue(jobQueueName=QUEUE, state="ENABLED", priority=1,
                               computeEnvironmentOrder=[{"order": 1,
                                                         "computeEnvironment": ce["computeEnvironmentArn"]}])

    # ---- Metaflow
    def metaflow_env(self, home: Path) -> dict[str, str]:
        """Metaflow on S3 and AWS Batch against this endpoint, with no user configuration
        (`home`: an empty METAFLOW_HOME), for a process started inside the namespace."""
        Path(home).mkdir(parents=True, exist_ok=True)
        return {
            "METAFLOW_HOME": str(home),
            "METAFLOW_PROFILE": "",
            "METAFLOW_DEFAULT_DATASTORE": "s3",
            "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
            "METAFLOW_CARD_S3ROOT": f"s3://{BUCKET}/cards",
            "METAFLOW_S3_ENDPOINT_URL": self.url,
            "METAFLOW_BATCH_JOB_QUEUE": QUEUE,
            "METAFLOW_ECS_S3_ACCESS_IAM_ROLE": self.role_arn,
            # every botocore client (Metaflow's Batch client, its S3 client) goes to moto
            "AWS_ENDPOINT_URL": self.url,
            "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS": "false",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    # ---- jobs
    def jobs(self, statuses: tuple[str, ...] = UNFINISHED) -> dict[str, list[dict]]:
        """The queue's jobs by status (list_jobs, as `aws batch list-jobs --job-status S`)."""
        def listed() -> dict[str, list[dict]]:
            batch = self.client("batch")
            return {s: batch.list_jobs(jobQueue=QUEUE, jobStatus=s)["jobSummaryList"] for s in statuses}
        return self.call(listed)

    def describe(self, job_ids: list[str]) -> list[dict]:
        return self.call(lambda: self.client("batch").describe_jobs(jobs=job_ids)["jobs"]) if job_ids else []

    def terminate_unfinished(self, reason: str) -> int:
        ids = [j["jobId"] for js in self.jobs().values() for j in js]
        for job_id in ids:
            self.aws("batch", "terminate_job", jobId=job_id, reason=reason)
        return len(ids)

    def wait_until_no_job(self, timeout_s: float = 60) -> dict[str, list[dict]]:
        """Wait for the queue to have no unfinished job; the unfinished jobs left (none: empty lists)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = self.jobs()
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    # ---- containers, from podman's own records
    def events(self) -> list[dict]:
        """podman's events log of this session (every container created, started, died, removed)."""
        if not self.events_log.exists():
            return []
        return [json.loads(line) for line in self.events_log.read_text().splitlines() if line.strip()]

    def containers(self, status: str = "start") -> list[dict]:
        """Containers events of one kind ("start": each container started), oldest first."""
        return [e for e in self.events() if e.get("Type") == "container" and e.get("Status") == status]

    def existing_containers(self) -> list[dict]:
        """Containers of this session still in podman's storage (running or not)."""
        ours = {e["ID"] for e in self.containers("create")}
        out = podman.podman("ps", "-a", "--format", "json", conf=self.conf, timeout=60).stdout
        return [c for c in json.loads(out or "[]") if c["Id"] in ours]

    def remove_containers(self) -> list[str]:
        left = [c["Id"] for c in self.existing_containers()]
        podman.remove_containers(left, conf=self.conf)
        return left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ---- moto's server, its Batch backend completed (`python -m tests.engines.batch -H HOST -p PORT`)

_SUBMITTING = threading.local()  # the nodeOverrides of the SubmitJob request this thread answers


def _nodes(targets: str, num_nodes: int) -> range:
    """AWS Batch's targetNodes ("0:0", "1:", ":3", "2") as node indexes."""
    start, sep, end = targets.partition(":")
    if not sep:
        return range(int(start), int(start) + 1)
    return range(int(start or 0), int(end) + 1 if end else num_nodes)


def _with_env(container: dict, env: dict[str, str]) -> dict:
    merged = {e["name"]: e["value"] for e in container.get("environment", [])}
    merged.update(env)
    return {**container, "environment": [{"name": k, "value": v} for k, v in merged.items()]}


def as_aws_batch_runs_it(job: Any) -> None:
    """Before moto runs `job`: its containers get what AWS Batch would give them (see the
    module's docstring): the agent's variables; on a multi-node job, each node its own container
    with the job's nodeOverrides applied and the node variables."""
    queue = job.job_queue
    env = agent_env(queue.environments[0].name if queue.environments else "", queue.name, len(job.attempts) + 1)
    definition = job.job_definition
    if definition.container_properties is not None:
        overrides = dict(job.container_overrides)
        overrides["environment"] = [*overrides.get("environment", []),
                                    *({"name": k, "value": v} for k, v in env.items())]
        job.container_overrides = overrides
        return
    if definition.node_properties is None:
        return
    props = copy.deepcopy(definition.node_properties)
    num_nodes, main = int(props["numNodes"]), int(props.get("mainNode", 0))
    containers: dict[int, dict] = {}
    for node_range in props["nodeRangeProperties"]:
        for i in _nodes(node_range["targetNodes"], num_nodes):
            containers[i] = copy.deepcopy(node_range["container"])
    for override in (getattr(job, "node_overrides", None) or {}).get("nodePropertyOverrides", []):
        given = override.get("containerOverrides", {})
        for i in _nodes(override["targetNodes"], num_nodes):  # an override replaces, its environment adds
            containers[i].update({k: v for k, v in given.items() if k != "environment"})
            containers[i] = _with_env(containers[i], {e["name"]: e["value"] for e in given.get("environment", [])})
    for i in containers:
        containers[i] = _with_env(containers[i], {**env, "AWS_BATCH_JOB_ID": f"{job.job_id}#{i}",
                                                  "AWS_BATCH_JOB_NODE_INDEX": str(i),
                                                  "AWS_BATCH_JOB_NUM_NODES": str(num_nodes),
                                                  "AWS_BATCH_JOB_MAIN_NODE_INDEX": str(main)})
    props["nodeRangeProperties"] = [{"targetNodes": str(i), "container": containers[i]} for i in sorted(containers)]
    job.job_definition = copy.copy(definition)  # this job's own: the registered definition stays as it was
    job.job_definition.node_properties = props


def extend_moto() -> None:
    """Install `as_aws_batch_runs_it` and the nodeOverrides of SubmitJob into moto's Batch backend."""
    from moto.batch import models, responses

    submitjob, job_init, job_run = responses.BatchResponse.submitjob, models.Job.__init__, models.Job.run

    def submitjob_with_node_overrides(self: Any) -> str:
        _SUBMITTING.node_overrides = self._get_param("nodeOverrides")
        try:
            return submitjob(self)
        finally:
            _SUBMITTING.node_overrides = None

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        job_init(self, *args, **kwargs)
        self.node_overrides = getattr(_SUBMITTING, "node_overrides", None)

    def run(self: Any) -> None:
        as_aws_batch_runs_it(self)
        job_run(self)

    responses.BatchResponse.submitjob = submitjob_with_node_overrides
    models.Job.__init__ = init
    models.Job.run = run


if __name__ == "__main__":
    from moto.server import main

    extend_moto()
    main(sys.argv[1:])
