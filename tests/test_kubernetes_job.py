"""compute: kubernetes without a cluster: the Kubernetes objects Metaflow's own code builds for a
cell's `train` step, from a matrix, through the real flow.

Two of Metaflow's own paths build them, and both run here for real:

- `argo-workflows create --only-json` compiles the whole workflow (a pod template for every step;
  `train` is @parallel, so its template is a JobSet) and prints it. It talks to no cluster; it
  uploads the code package to the S3 datastore: LocalAWS (moto, in this process, on loopback).
- `run` starts each cell's train task with `kubernetes step`, which POSTs a JobSet to the API
  server of its kubeconfig: here `ApiRecorder`, on loopback, which keeps the body and refuses it
  (403 Forbidden), so the task fails, the run ends, and nothing is scheduled anywhere.

Every `train` task is @parallel (a cell of N nodes is N tasks), so Metaflow builds a JobSet for it,
never a plain Job: one `control` pod and N-1 `worker` pods. Under `run`, Metaflow refuses a
one-node cell outright (`num_parallel` <= 1 with @kubernetes); under Argo Workflows the worker
count is an expression evaluated when the run starts.

Nothing here leaves loopback: the S3 endpoint and the API server are local, and where strace
works each flow runs under it and every connect()/send to an inet address is checked to be
127.0.0.1 or ::1.

What only a real cluster proves, and no test here does: that the pods are scheduled (a node
with that instance-type label and enough allocatable CPU, memory and ephemeral storage), that the
NVIDIA device plugin hands them the GPUs, that the JobSet controller is installed and makes the
headless service whose DNS name is the control pod's address (MF_MASTER_ADDR), that NCCL
connects between the pods (the rendezvous port, network policies, EFA), that the image is pulled
(registry credentials, the service account's IAM role for S3), and that the step runs in it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from steps.plan import catalog
from tests.aws.endpoint import LocalAWS
from tests.conftest import REPO

# Metaflow's @kubernetes needs the Kubernetes client library (a soft dependency of Metaflow): on
# the machine that launches the tasks, and to build the Argo Workflows template.
kubernetes = pytest.importorskip(
    "kubernetes", reason="the 'kubernetes' package (Metaflow's client for @kubernetes) is not installed")
from kubernetes.utils import parse_quantity  # noqa: E402

pytestmark = pytest.mark.slow  # each test loads the flow in Metaflow at least once (5 to 25 s)

FLOW = str(REPO / "flows" / "finetune_matrix.py")
BUCKET = "fm-kubernetes"
IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-matrix:0.1.0"
JOBSETS = "/apis/jobset.x-k8s.io/v1alpha2/namespaces/{}/jobsets"

# The pod spec as Metaflow writes it for each instance type: all its GPUs (a limit; Kubernetes
# copies an extended resource's limit to its request), its vCPUs less 2, and 90% of its memory
# (steps/flow/compute.py), which @kubernetes writes in M (10^6 bytes).
EXPECTED = {
    "g5.12xlarge": {"gpu": "4", "cpu": "46", "memory": "185542M"},
    "p4d.24xlarge": {"gpu": "8", "cpu": "94", "memory": "1113255M"},
}

MATRIX = {"name": "k8s-spec", "models": "llama-debug", "peft": "lora", "lr": 1e-3, "micro_batch": 4,
          "seq_len": 32, "compute": "kubernetes"}


# ---- a Kubernetes API server that records and refuses ------------------------------------------

class ApiRecorder:
    """An HTTP server on 127.0.0.1 in the API server's place: every request is kept (method, path,
    JSON body) and answered 403 Forbidden with a Kubernetes Status, as an API server answers a
    caller without the rights: the client raises, the task fails, nothing runs."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _refuse(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append((self.command, self.path, json.loads(body) if body else None))
                data = json.dumps({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                                   "reason": "Forbidden", "message": "recorded by the test; nothing is scheduled"})
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="kube-api", daemon=True)
        self._thread.start()

    def kubeconfig(self, path: Path) -> Path:
        """A kubeconfig whose only cluster is this server (a bearer token, no TLS, no exec plugin)."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "recorder",
            "clusters": [{"name": "recorder", "cluster": {"server": self.url}}],
            "users": [{"name": "recorder", "user": {"token": "test"}}],
            "contexts": [{"name": "recorder", "context": {"cluster": "recorder", "user": "recorder"}}]}))
        return path

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# ---- running the flow -------------------------------------------------------------------------

def _strace() -> list[str]:
    """strace's command line, where it is installed and may trace (a container may forbid ptrace);
    with a seccomp filter where the kernel allows it, so that only the traced calls stop."""
    path = shutil.which("strace")
    for line in ([path, "--seccomp-bpf", "-f", "-qq"], [path, "-f", "-qq"]) if path else ():
        probe = [*line, "-e", "trace=connect", "-o", os.devnull, "true"]
        if subprocess.run(probe, capture_output=True, timeout=30).returncode == 0:
            return line
    return []


STRACE = _strace()
INET = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def inet_addresses(log: Path) -> set[str]:
    """Every IPv4/IPv6 address a traced process connected or sent to."""
    return {a or b for a, b in INET.findall(log.read_text())} if log.is_file() else set()


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    with LocalAWS(tmp_path_factory.mktemp("aws")) as endpoint:
        endpoint.client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint


@pytest.fixture
def api():
    recorder = ApiRecorder()
    yield recorder
    recorder.stop()


def flow_env(aws: LocalAWS, api: ApiRecorder, tmp_path: Path, **extra: str) -> dict[str, str]:
    """Metaflow on the S3 datastore of LocalAWS and a kubeconfig naming only the recorder. A
    developer's own Metaflow, AWS and Kubernetes settings are left out (no config file, no profile,
    no in-cluster credentials), so nothing can point the run anywhere else."""
    keep = {"METAFLOW_DATASTORE_SYSROOT_LOCAL", "METAFLOW_USER"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBE", "METAFLOW_")) or k in keep}
    (tmp_path / "metaflow-home").mkdir(exist_ok=True)
    return {**env, **aws.client_env(),
            "METAFLOW_HOME": str(tmp_path / "metaflow-home"),  # no ~/.metaflowconfig
            "METAFLOW_DEFAULT_METADATA": "local",
            "METAFLOW_DATASTORE_SYSROOT_S3": f"s3://{BUCKET}/metaflow",
            "KUBECONFIG": str(api.kubeconfig(tmp_path / "kubeconfig")),
            "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports"),
            **extra}


def run_flow(tmp_path: Path, matrix: dict, args: list[str], env: dict[str, str], timeout: float = 300):
    """The flow on `matrix` with `args` (on the S3 datastore), in its own session so that a hung
    run is stopped whole; (exit code, stdout, stderr, inet addresses it reached)."""
    path = tmp_path / f"{matrix['name']}.yaml"
    path.write_text(yaml.safe_dump(matrix))
    cmd = [sys.executable, FLOW, "--datastore", "s3", "--config", "matrix", str(path), *args]
    audit = tmp_path / "connect.log"
    if STRACE:
        audit.unlink(missing_ok=True)
        cmd = [*STRACE, "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(audit), *cmd]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, by its leader's id
        proc.communicate()
        raise
    return proc.returncode, out, err, inet_addresses(audit)


def assert_loopback_only(addresses: set[str]) -> None:
    if STRACE:
        assert addresses and addresses <= {"127.0.0.1", "::1"}, addresses


def pod_spec_checks(pod: dict, instance: str, namespace: str, service_account: str, label: str,
                    shm_mb: int, disk_mb: int) -> None:
    """One pod template of the train step against the catalog's instance and the matrix's remote."""
    known = catalog.instances()[instance]
    assert EXPECTED[instance] == {"gpu": str(known.devices_per_node), "cpu": str(known.vcpus - 2),
                                  "memory": f"{int(known.memory_gb * 2**30 * 0.9 / 1e6)}M"}
    expected = EXPECTED[instance]
    assert pod["metadata"]["namespace"] == namespace
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"nvidia.com/gpu": expected["gpu"]}
    assert container["resources"]["requests"] == {"cpu": expected["cpu"], "memory": expected["memory"],
                                                  "ephemeral-storage": f"{disk_mb}M"}
    share = float(parse_quantity(expected["memory"])) / (known.memory_gb * 2**30)
    assert round(share, 4) == 0.9  # 90% of the instance's GiB
    assert spec["nodeSelector"] == {label: instance}
    assert spec["serviceAccountName"] == service_account
    assert spec["restartPolicy"] == "Never"
    # /dev/shm: an in-memory emptyDir of shared_memory_mb MiB (this one Metaflow writes in Mi)
    assert container["volumeMounts"] == [{"mountPath": "/dev/shm", "name": "dhsm"}]
    assert spec["volumes"] == [{"name": "dhsm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{shm_mb}Mi"}}]
    assert parse_quantity(spec["volumes"][0]["emptyDir"]["sizeLimit"]) == shm_mb * 2**20


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container["env"]}


# ---- Argo Workflows: the whole workflow, compiled offline ---------------------------------------

def test_argo_workflow_template_runs_train_as_a_jobset_with_the_instance_resources(aws, api, tmp_path):
    remote = {"image": IMAGE, "namespace": "ml", "service_account": "trainer", "shared_memory_mb": 8192,
              "disk_mb": 200000}
    matrix = {**MATRIX, "strategy": "ddp", "gpus": 4, "instance": "g5.12xlarge", "retries": 2, "remote": remote}
    # Argo Workflows runs a whole workflow in one namespace: Metaflow's must be the matrix's.
    rc, out, err, reached = run_flow(tmp_path, matrix, ["argo-workflows", "create", "--only-json"],
                                     flow_env(aws, api, tmp_path))
    assert rc == 1, out[-2000:] + err[-3000:]
    assert_loopback_only(reached)
    assert ("Multi-namespace Kubernetes execution of flows in Argo Workflows is not currently supported" in err
            and "Step train is trying to override the default Kubernetes namespace default" in err), err[-3000:]

    rc, out, err, reached = run_flow(tmp_path, matrix, ["argo-workflows", "create", "--only-json"],
                                     flow_env(aws, api, tmp_path, METAFLOW_KUBERNETES_NAMESPACE="ml"))
    assert rc == 0, err[-3000:]
    workflow = json.loads(out)
    assert workflow["kind"] == "WorkflowTemplate" and workflow["metadata"]["namespace"] == "ml"
    templates = {t["name"]: t for t in workflow["spec"]["templates"]}

    # train: a JobSet Argo creates, one control job and num-parallel - 1 workers, where launch's
    # num_parallel (the cell's nodes) is read when the run starts.
    train = templates["train"]
    # the matrix's retries, as @retry(times=2, minutes_between_retries=0)
    assert train["retryStrategy"] == {"retryPolicy": "Always", "limit": 2, "backoff": {"duration": "0m"}}
    assert {k: train["resource"][k] for k in ("action", "successCondition", "failureCondition")} == {
        "action": "create", "successCondition": "status.terminalState == Completed",
        "failureCondition": "status.terminalState == Failed"}
    manifest = train["resource"]["manifest"]
    workers = "replicas: {{=asInt(inputs.parameters.workerCount)}}"
    assert manifest.count(workers) == 1
    jobset = yaml.safe_load(manifest.replace(workers, "replicas: -1"))
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    replicated = {job["name"]: job for job in jobset["spec"]["replicatedJobs"]}
    assert {name: job["replicas"] for name, job in replicated.items()} == {"control": 1, "worker": -1}
    (call,) = [t for t in templates["launch-foreach-parallel"]["dag"]["tasks"] if t["template"] == "train"]
    arguments = {p["name"]: p["value"] for p in call["arguments"]["parameters"]}
    assert arguments["workerCount"] == "{{=sprig.int(sprig.sub(sprig.int(inputs.parameters['num-parallel']),1))}}"
    assert {"name": "num-parallel", "valueFrom": {"path": "/mnt/out/num_parallel"}} in \
        templates["launch"]["outputs"]["parameters"]
    for name, job in replicated.items():
        assert (job["template"]["spec"]["parallelism"], job["template"]["spec"]["completions"]) == (1, 1), name
        assert job["template"]["spec"]["backoffLimit"] == 0  # retries are Argo's (retryStrategy)
        pod = job["template"]["spec"]["template"]
        pod_spec_checks(pod, "g5.12xlarge", "ml", "trainer", "node.kubernetes.io/instance-type", 8192, 200000)
        env = env_of(pod["spec"]["containers"][0])
        assert env["MF_WORLD_SIZE"] == "{{inputs.parameters.num-parallel}}"
        assert env["UBF_CONTEXT"] == ("ubf_control" if name == "control" else "ubf_task")
        assert env["METAFLOW_DEFAULT_DATASTORE"] == "s3"
        assert env["METAFLOW_DATASTORE_SYSROOT_S3"] == f"s3://{BUCKET}/metaflow"
        assert " step train " in pod["spec"]["containers"][0]["command"][2]

    # The other steps run on Kubernetes too under Argo, with Metaflow's defaults: its configured
    # image (unset here: python:<this Python>), 1 CPU, 4096 MB, no GPU and no node selector.
    for step in ("start", "launch", "gather", "join", "end"):
        template = templates[step]
        container = template["container"]
        assert container["image"] == f"python:{sys.version_info[0]}.{sys.version_info[1]}", step
        assert container["resources"]["requests"] == {"cpu": "1", "memory": "4096M", "ephemeral-storage": "10240M"}
        assert not container["resources"]["limits"] and not template.get("nodeSelector"), step

    assert api.requests == []  # --only-json talks to no cluster
    assert_loopback_only(reached)


# ---- run: the JobSet `kubernetes step` sends to the API server ------------------------------------

def test_run_posts_one_jobset_of_two_pods_for_a_two_node_cell(aws, api, tmp_path):
    remote = {"image": IMAGE, "namespace": "ml", "service_account": "trainer", "shared_memory_mb": 16384,
              "disk_mb": 500000, "node_selector_label": "beta.kubernetes.io/instance-type"}
    matrix = {**MATRIX, "strategy": "ddp", "nodes": 2, "gpus": 8, "instance": "p4d.24xlarge", "retries": 0,
              "remote": remote}
    rc, out, err, reached = run_flow(tmp_path, matrix, ["run"], flow_env(aws, api, tmp_path))
    log = out + err
    assert rc == 1, log[-4000:]
    assert "1 cells to run, 0 refused" in log
    assert "Reason: Forbidden" in log and "recorded by the test; nothing is scheduled" in log  # the recorder's

    # One request: the JobSet, in the matrix's namespace (Metaflow's own default is `default`).
    assert [(method, path) for method, path, _ in api.requests] == [("POST", JOBSETS.format("ml"))]
    jobset = api.requests[0][2]
    assert (jobset["apiVersion"], jobset["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    name = jobset["metadata"]["name"]
    annotations = jobset["metadata"]["annotations"]
    assert (annotations["metaflow/step_name"], annotations["metaflow/attempt"]) == ("train", "0")
    replicated = {job["name"]: job for job in jobset["spec"]["replicatedJobs"]}
    assert {n: job["replicas"] for n, job in replicated.items()} == {"control": 1, "worker": 1}  # nodes: 2
    task = annotations["metaflow/control-task-id"]
    commands = {}
    for role, job in replicated.items():
        assert (job["template"]["spec"]["parallelism"], job["template"]["spec"]["completions"]) == (1, 1)
        assert job["template"]["spec"]["backoffLimit"] == 0  # retries are the runtime's (@retry)
        pod = job["template"]["spec"]["template"]
        pod_spec_checks(pod, "p4d.24xlarge", "ml", "trainer", "beta.kubernetes.io/instance-type", 16384, 500000)
        assert pod["spec"]["subdomain"] == name  # the JobSet's headless service names the pods
        container = pod["spec"]["containers"][0]
        env = env_of(container)
        # current.parallel: node 0's address (the control pod's DNS name) and the node count
        assert env["MF_MASTER_ADDR"] == f"{name}-control-0-0.{name}.ml.svc.cluster.local"
        assert env["MF_WORLD_SIZE"] == "2" and env["MF_PARALLEL_CONTROL_TASK_ID"] == task
        assert env["UBF_CONTEXT"] == ("ubf_control" if role == "control" else "ubf_task")
        assert ("MF_CONTROL_INDEX" in env) == (role == "control")
        commands[role] = container["command"][2]
    assert f"--split-index 0 --task-id {task})" in commands["control"]
    assert ("--split-index `expr $[MF_WORKER_REPLICA_INDEX] + 1` "
            f"--task-id {task}-worker-$MF_WORKER_REPLICA_INDEX)") in commands["worker"]

    # The code package the pods download is in the S3 datastore, with the flow, steps/ and configs/.
    (key,) = set(re.findall(rf"s3://{BUCKET}/(metaflow/FinetuneMatrixFlow/data/\w+/\w+)", commands["control"]))
    package = aws.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as tar:
        names = set(tar.getnames())
    assert {"finetune_matrix.py", "steps/flow/compute.py", "steps/train.py", "configs/instances.yaml"} <= names, \
        sorted(names)[:40]
    assert_loopback_only(reached)


def test_run_of_a_one_node_cell_is_refused_before_any_request(aws, api, tmp_path):
    """A one-node cell is a @parallel task of num_parallel 1, which Metaflow's `kubernetes step`
    refuses: under `run`, single-node cells cannot train on Kubernetes, and the flow says so when
    it loads, before any task (steps/flow/compute.py, remote_problems)."""
    remote = {"image": IMAGE, "namespace": "ml"}
    matrix = {**MATRIX, "strategy": "single", "gpus": 1, "instance": "g5.12xlarge", "retries": 0, "remote": remote}
    rc, out, err, reached = run_flow(tmp_path, matrix, ["run"], flow_env(aws, api, tmp_path))
    log = out + err
    assert rc == 1, log[-4000:]
    assert "The matrix cannot run remotely:" in log and "Task is starting" not in log
    assert ("nodes: 1 with compute: kubernetes: a cell's train step is a Metaflow @parallel step, which Metaflow "
            "runs on Kubernetes as a JobSet of 2 nodes or more only") in log
    assert api.requests == []
    assert reached <= {"127.0.0.1", "::1"}  # refused as the flow loads: nothing sent at all
