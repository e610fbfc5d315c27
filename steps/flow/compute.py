"""Where and how the flow's train step runs, decided by the matrix, not by editing the flow.

`MatrixCompute` is a Metaflow FlowMutator: once the `matrix` Config is parsed it adds to the
train step @retry (real failures), @catch (`on_error: record`) and, for `compute: kubernetes`
or `batch`, the compute decorator with the GPUs, CPUs, memory and node selector of the matrix's
instance type from `configs/instances.yaml` (`compute: sagemaker` adds no decorator: the step
itself submits the cell's training job, `steps/flow/sagemaker`). It also ships `steps/` and `configs/` in
Metaflow's code package, so remote tasks import the same code (they sit next to the flow file
in the package; see `package_files`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaflow import FlowMutator
from metaflow.exception import MetaflowException
from metaflow.packaging_sys import ContentType

from steps import REPO_ROOT, plain

TRAIN_STEP, GATHER_STEP = "train", "gather"
MEMORY_SHARE = 0.9  # of the instance's memory: the rest for the node's own daemons
PACKAGED = (("steps", "*.py"), ("configs", "*.yaml"))


def package_files(root: Path = REPO_ROOT) -> Iterator[tuple[str, str]]:
    """(path, name in the package): the package keeps the flow's folder as its root."""
    for folder, pattern in PACKAGED:
        for path in sorted((root / folder).rglob(pattern)):
            if "__pycache__" not in path.parts:
                yield str(path), str(path.relative_to(root))


def remote_resources(matrix: dict[str, Any]) -> dict[str, Any]:
    """Arguments of @kubernetes / @batch for the matrix's one instance type (`matrix` is
    validated, so every key is there).

    A cell owns the whole machine (all its GPUs), so timings are not shared and the cost is
    the instance's hourly price. CPU and memory leave a margin for the node's own daemons.
    """
    from steps.plan import catalog

    instance = catalog.instances()[matrix["instance"][0]]
    remote = matrix["remote"]
    memory_bytes = (instance.memory_gb or 16) * 2**30 * MEMORY_SHARE
    args: dict[str, Any] = {
        "gpu": instance.devices_per_node,
        "cpu": max(1, (instance.vcpus or 4) - 2),
        # Batch takes MiB; Metaflow's @kubernetes writes the number with the suffix M (10^6 bytes)
        "memory": int(memory_bytes / (1e6 if matrix["compute"] == "kubernetes" else 2**20)),
    }
    if remote.get("image"):
        args["image"] = remote["image"]
    if remote.get("shared_memory_mb"):
        args["shared_memory"] = remote["shared_memory_mb"]
    if matrix["compute"] == "kubernetes":
        args["node_selector"] = {remote["node_selector_label"]: instance.name}
        for key in ("namespace", "service_account"):
            if remote.get(key):
                args[key] = remote[key]
        if remote.get("disk_mb"):
            args["disk"] = remote["disk_mb"]
    else:
        args["queue"] = remote["queue"]
    return args


def catches(matrix: dict[str, Any]) -> bool:
    """`on_error: record` uses @catch, which Metaflow does not allow with @parallel on
    Kubernetes; there the train step records the error itself on its last attempt."""
    return matrix["on_error"] == "record" and matrix["compute"] != "kubernetes"


def train_decorators(matrix: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(decorator name, arguments) for the train step."""
    decos = [("retry", {"times": matrix["retries"], "minutes_between_retries": 0})]
    if catches(matrix):
        decos.append(("catch", {"var": "failure", "print_exception": True}))
    if matrix["compute"] in ("kubernetes", "batch"):  # sagemaker: the step submits a job
        decos.append((matrix["compute"], remote_resources(matrix)))
    return decos


class RemoteRefused(MetaflowException):
    """A remote matrix that cannot reach its tasks: refused before any task or job starts."""

    headline = "The matrix cannot run remotely"


def datastore_of(argv: list[str]) -> str:
    """The datastore this run's tasks use: `--datastore X` on its command line, else Metaflow's
    configured default (METAFLOW_DEFAULT_DATASTORE or its config file)."""
    for i, arg in enumerate(argv):
        if arg == "--datastore" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--datastore="):
            return arg.split("=", 1)[1]
    from metaflow.metaflow_config import DEFAULT_DATASTORE

    return DEFAULT_DATASTORE


def remote_problems(matrix: dict[str, Any], datastore: str) -> list[str]:
    """What a Kubernetes or Batch run needs beyond a valid matrix (which already names its image
    and queue): a datastore its remote tasks can reach; on Kubernetes, cells of two nodes or more
    (the train step is @parallel, and Metaflow's `kubernetes step` refuses a JobSet of one)."""
    problems = []
    if matrix["compute"] in ("kubernetes", "batch") and datastore != "s3":
        problems.append(
            f"compute: {matrix['compute']} runs the cells' train steps on other machines, which cannot read "
            f"Metaflow's {datastore!r} datastore on this one; run with `--datastore s3` (or set "
            f"METAFLOW_DEFAULT_DATASTORE=s3 and METAFLOW_DATASTORE_SYSROOT_S3=s3://<bucket>/<prefix>, as your "
            f"Metaflow deployment's configuration does)")
    nodes = {*matrix.get("nodes", []), *(n for rule in matrix.get("include") or [] for n in rule.get("nodes") or [])}
    if matrix["compute"] == "kubernetes" and 1 in nodes:
        problems.append(
            "nodes: 1 with compute: kubernetes: a cell's train step is a Metaflow @parallel step, which Metaflow "
            "runs on Kubernetes as a JobSet of 2 nodes or more only (`kubernetes step` refuses num_parallel 1); "
            "give the cells nodes >= 2, or run one-node cells with compute: batch or compute: sagemaker")
    return problems


class MatrixCompute(FlowMutator):
    """Runs at every load of the flow (each task and card process): it imports nothing of the
    planner's (pydantic, the schema), which a card process never needs."""

    def pre_mutate(self, mutable_flow) -> None:
        matrix = plain(dict(mutable_flow.configs)["matrix"])
        if {"run", "resume"} & set(sys.argv) and (problems := remote_problems(matrix, datastore_of(sys.argv))):
            raise RemoteRefused("\n".join(problems))
        for name, step in mutable_flow.steps:
            if name == TRAIN_STEP:
                for deco, kwargs in train_decorators(matrix):
                    step.add_decorator(deco, deco_kwargs=kwargs, duplicates=step.OVERRIDE)
            if name in (TRAIN_STEP, GATHER_STEP) and matrix["plan"].get("dry_run"):
                # Nothing trains: no live card to draw, no cell card to show (a dry-run row), and
                # three card processes a cell fewer (Metaflow renders a card once more at a task's end).
                step.remove_decorator("card")

    def add_to_package(self):
        for path, name in package_files():
            yield path, name, ContentType.USER_CONTENT
