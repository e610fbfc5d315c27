"""A cell as a SageMaker training job: its name, S3 layout, command, limits and inputs.

Pure: nothing here talks to AWS, so every decision is testable offline. `submit` turns a
JobPlan into a ModelTrainer; `entry` is what the job runs in its container.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.plan import catalog
from steps.plan.credentials import named_environment
from steps.plan.schema import CellSpec

# The SDK appends "-YYYYmmddHHMMSS" (15 characters) to the base name; SageMaker allows 63.
BASE_NAME_MAX = 48
DEFAULT_PREFIX = "finetune-matrix"
CHECKPOINT_LOCAL = "/opt/ml/checkpoints"
# sm_train.sh runs the command in the code channel (/opt/ml/input/data/code) with
# $SM_PYTHON_CMD, the container's python.
COMMAND = "$SM_PYTHON_CMD -m steps.flow.sagemaker.entry --cell cell.yaml"
# What the trainer imports beside the image's own torch; pinned to the versions here, so the
# job runs the library versions this machine tested.
REQUIREMENTS = ("transformers", "peft", "datasets", "accelerate", "safetensors", "tokenizers",
                "pydantic", "PyYAML", "psutil", "tqdm")
# Channels for inputs that live on this machine (the SDK uploads them).
DATA_CHANNEL, MODEL_CHANNEL = "data", "model"


def base_job_name(run_id: str, cell_id: str, attempt: int) -> str:
    """fm-<run>-<cell>-<hash>-a<attempt>: readable, valid ([a-zA-Z0-9-]), unique per run, cell and
    attempt (the hash keeps truncated cell ids apart), at most 48 characters."""
    slug = lambda text: re.sub(r"[^a-zA-Z0-9]+", "-", str(text)).strip("-")  # noqa: E731
    digest = hashlib.sha1(f"{run_id}/{cell_id}".encode()).hexdigest()[:6]
    head, tail = f"fm-{slug(run_id)[:20]}-", f"-{digest}-a{attempt}"
    room = BASE_NAME_MAX - len(head) - len(tail)
    return re.sub("-+", "-", head + slug(cell_id)[:room].strip("-") + tail)


def requirements(cell: CellSpec) -> list[str]:
    """pip lines for the container: the trainer's libraries at this machine's versions;
    DeepSpeed and bitsandbytes only where the cell uses them."""
    names = list(REQUIREMENTS)
    if cell.layout.deepspeed or cell.train.launcher == "deepspeed":
        names.append("deepspeed")
    if cell.peft == "qlora" or cell.train.optimizer == "paged_adamw_8bit":
        names.append("bitsandbytes")
    lines = []
    for name in names:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return lines


@dataclass(frozen=True)
class S3Layout:
    """Where one attempt of a cell keeps its files. Checkpoints are per cell, not per attempt,
    so a retried (or resumed) cell starts from the last one."""

    output: str  # SageMaker's own outputs: <job>/output/model.tar.gz, output.tar.gz
    checkpoints: str
    results: str  # the cell folder the entry uploads: metrics.json, train.log, adapter/

    @classmethod
    def of(cls, prefix: str, run_id: str, cell_id: str, attempt: int,
           checkpoint_run: str | None = None) -> S3Layout:
        prefix = prefix.rstrip("/")
        cell = f"cells/{cell_id}"
        return cls(output=f"{prefix}/runs/{run_id}/output",
                   checkpoints=f"{prefix}/runs/{checkpoint_run or run_id}/{cell}/checkpoints",
                   results=f"{prefix}/runs/{run_id}/{cell}/attempt-{attempt}")


@dataclass
class JobPlan:
    """Everything CreateTrainingJob needs, decided from the cell and the matrix's `remote:`."""

    base_name: str
    instance_type: str
    instance_count: int
    processes_per_host: int
    image: str | None  # None: the AWS PyTorch training image (looked up by `submit`)
    max_runtime_s: int
    max_wait_s: int | None
    spot: bool
    volume_gb: int
    keep_alive_s: int
    subnets: list[str]
    security_groups: list[str]
    tags: dict[str, str]
    environment: dict[str, str]
    s3: S3Layout
    role: str | None = None
    region: str | None = None
    requirements: list[str] = field(default_factory=list)
    # channel -> local path, uploaded by the SDK; the entry points the cell at them.
    inputs: dict[str, str] = field(default_factory=dict)


def split_s3(uri: str) -> tuple[str, str]:
    """s3://bucket/some/prefix -> (bucket, "some/prefix")."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key.strip("/")


def sagemaker_instance(instance: str) -> str | None:
    entry = catalog.instances().get(instance)
    return entry.sagemaker_instance if entry else None


def local_inputs(cell: CellSpec) -> dict[str, str]:
    """Files the cell reads from this machine: its data file or folder, a model directory."""
    inputs = {}
    if cell.data.path and Path(cell.data.path).exists():
        inputs[DATA_CHANNEL] = str(Path(cell.data.path).resolve())
    if Path(cell.model).is_dir():
        inputs[MODEL_CHANNEL] = str(Path(cell.model).resolve())
    return inputs


def plan_job(cell: CellSpec, remote: dict[str, Any], run_id: str, attempt: int, prefix: str,
             checkpoint_run: str | None = None) -> JobPlan:
    """The job of one attempt of one cell. `remote` is the validated matrix's `remote:`."""
    ml_type = sagemaker_instance(cell.instance)
    if ml_type is None:
        raise ValueError(f"instance {cell.instance!r} is not offered by SageMaker "
                         f"(no sagemaker_instance in configs/instances.yaml)")
    runtime = int(cell.train.timeout_s) + int(remote.get("startup_allowance_s", 1800))
    spot = bool(remote.get("spot"))
    max_wait = int(remote.get("max_wait_s") or 2 * runtime) if spot else None
    if max_wait is not None and max_wait < runtime:
        raise ValueError(f"remote.max_wait_s={max_wait} is below the job's run limit {runtime} s "
                         f"(timeout_s + startup_allowance_s); SageMaker needs max_wait_s >= it")
    s3 = S3Layout.of(prefix, run_id, cell.cell_id, attempt, checkpoint_run)
    tags = {"finetune-matrix:run": str(run_id), "finetune-matrix:cell": cell.cell_id[:256],
            "finetune-matrix:matrix": cell.matrix or "-", **(remote.get("tags") or {})}
    environment = {
        "FINETUNE_MATRIX_RESULTS_S3": s3.results,
        "FINETUNE_MATRIX_CHECKPOINT_DIR": CHECKPOINT_LOCAL,
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **named_environment(remote.get("env") or []),
    }
    return JobPlan(
        base_name=base_job_name(run_id, cell.cell_id, attempt),
        instance_type=ml_type,
        instance_count=cell.nodes,
        processes_per_host=cell.gpus,
        image=remote.get("image"),
        max_runtime_s=runtime,
        max_wait_s=max_wait,
        spot=spot,
        volume_gb=int(remote.get("volume_gb") or 100),
        keep_alive_s=int(remote.get("keep_alive_s") or 0),
        subnets=list(remote.get("subnets") or []),
        security_groups=list(remote.get("security_groups") or []),
        tags=tags,
        environment=environment,
        s3=s3,
        role=remote.get("role"),
        region=remote.get("region"),
        requirements=requirements(cell),
        inputs=local_inputs(cell),
    )


def cost_usd(instance: str, billable_s: float | None, instance_count: int) -> float | None:
    """What SageMaker bills: BillableTimeInSeconds per instance, at its training price."""
    entry = catalog.instances().get(instance)
    if entry is None or billable_s is None or entry.sagemaker_price_per_hour_usd is None:
        return None
    return billable_s / 3600 * entry.sagemaker_price_per_hour_usd * instance_count
