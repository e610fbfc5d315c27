"""What a cell measured, as one typed contract: `metrics.json`.

The trainer fills it as it goes (a failure still reports what was measured), the launcher
completes it (wall time, a timeout or hang with the curve so far), the flow adds the cost, and
the results table, the cards and the report read the same names. A name that is not declared
here cannot be written: a typo fails where it is made, not at report time. The names follow
the design's contract (the results table uses the same names for the same things).
Importing this module does not import torch: the flow's processes read metrics without it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from steps import library_versions

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3
Outcome = Literal["running", "ok", "oom", "diverged", "error", "timeout", "hang", "stopped", "skipped"]


def mlflow_status(outcome: str) -> str:
    """A cell's outcome as its MLflow run's status: ok FINISHED; stopped by the launcher (hang,
    timeout) KILLED; oom, diverged, error FAILED (the tag `outcome` says which)."""
    return {"ok": "FINISHED", "hang": "KILLED", "timeout": "KILLED", "stopped": "KILLED"}.get(outcome, "FAILED")

# Working files the trainer leaves for the launcher's hang watch, in the cell's folder: one
# heartbeat file per rank, and rank 0's curve so far (one JSON point per line).
HEARTBEAT_DIR = "heartbeat"
TRAINING = "training"  # a heartbeat file's second line once its rank trains
PARTIAL_CURVES = "partial.jsonl"
TRACK_FILE = "track.json"  # the cell's MLflow run (id, server), for the flow to close a stopped cell's run


def rank_prefix(rank: int) -> str:
    """What starts each log line of a rank, as torchrun's `--tee` writes it."""
    return f"[default{rank}]:"


LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "metaflow")


def versions() -> dict[str, str]:
    return {"python": sys.version.split()[0],
            **{lib: version or "not installed" for lib, version in library_versions(LIBRARIES).items()}}


def write_json_atomic(path: Path, data: dict[str, Any], first_wins: bool = False) -> bool:
    """Write via a temp file; with first_wins, keep an existing file (the first failure report)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))
    if first_wins:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    os.replace(tmp, path)
    return True


LAUNCHER_PID_ENV = "FINETUNE_MATRIX_LAUNCHER_PID"
"""Set by the launcher for the process it starts (the trainer's `measure.cell_root`): the cell's
processes are that process's tree."""


class _Record(BaseModel):
    """Declared names only; values checked when set. Read by name like the JSON it is written
    as (`m["loss_curve"][0]["loss"]`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __getitem__(self, name: str) -> Any:
        if name not in type(self).model_fields:
            raise KeyError(name)
        return getattr(self, name)


class LossPoint(_Record):
    """One optimizer step: the loss over the global batch, its learning rate and tokens, and the
    training time at its end (evaluation and checkpoints excluded)."""

    step: int
    loss: float
    lr: float | None = None
    tokens: float
    time_s: float


class ValPoint(_Record):
    step: int
    time_s: float
    val_loss: float
    accuracy: float | None = None
    token_accuracy: float | None = None


class Warmup(_Record):
    """The first steps, left out of the throughput (compilation, allocator and cache warm-up)."""

    steps: int
    s: float
    tokens_per_s: float | None = None


class CellMetrics(_Record):
    """Everything one cell reports. Unset values are None: a failed cell has some of them."""

    cell_id: str | None = None
    outcome: Outcome = "running"
    error: str | None = None
    # the cell's shape
    world_size: int | None = None
    dp_size: int | None = None
    global_batch: int | None = None
    # data and model
    data_source: str | None = None
    train_examples: int | None = None
    val_examples: int | None = None
    train_examples_cut: int | None = None  # training examples longer than seq_len (their ends dropped)
    train_target_tokens: int | None = None  # tokens the loss is on, one pass over the training split
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    lora_targets: list[str] | None = None  # the modules adapted (PEFT's default when unset)
    # How parameters are stored: the frozen base (full fine-tuning: all weights) and the
    # trainable ones ("fp32", "bf16", "fp16", "4bit"); under mixed precision a LoRA base is bf16.
    weights_dtype: str | None = None
    trainable_dtype: str | None = None
    # What ran: the attention kernel transformers picked, and whether the optimizer was fused.
    attn_implementation: str | None = None
    fused_optimizer: bool | None = None
    # train.tf32 as it ran: fp32 matmuls on TF32 tensor cores (an fp32 cell's MFU is then
    # against the TF32 peak); false on a device without them (before Ampere, a CPU)
    tf32: bool | None = None
    # train.lora_kernels: how many SwiGLU MLPs and adapted projections ran through the kernels
    lora_kernels: dict[str, int] | None = None
    # why they did not run although the cell asked for them, where the trainer found it in the
    # model (adapted layers that are not bias-free Linear layers); the results row's
    # `lora_kernels_off` holds it, or the reason the settings give
    lora_kernels_off: str | None = None
    pipeline_schedule: str | None = None
    resumed_from_step: int | None = None
    device: str | None = None
    versions: dict[str, str] | None = None
    # speed
    tokens_per_s: float | None = None
    tokens_per_s_per_device: float | None = None
    step_s: float | None = None
    epoch_s: float | None = None
    flops_per_token: float | None = None
    achieved_tflops: float | None = None
    mfu: float | None = None
    warmup: Warmup | None = None
    # memory
    peak_mem_gb: float | None = None
    # What a rank held before the model (CPU: its resident libraries; GPU: allocated bytes):
    # the planner's estimate is compared on top of it.
    runtime_baseline_gb: float | None = None
    peak_mem_gb_per_rank: list[float] | None = None
    peak_reserved_gb_per_rank: list[float] | None = None
    # GPU only, from NVML during the timed steps: mean utilisation (share of time a kernel ran)
    # per rank and over ranks, and the most memory in use per rank (CUDA context and NCCL
    # buffers included, which the allocator's peak above leaves out).
    gpu_util_pct: float | None = None
    gpu_util_pct_per_rank: list[float] | None = None
    gpu_mem_used_gb_per_rank: list[float] | None = None
    # The machine during the timed steps (rank 0's node; on GPU machines its host CPU): the
    # 1-minute load average at their start and end, and the share of the cell's cores used by
    # processes outside the cell (0..1; `contended` above CONTENDED_SHARE).
    load_avg_start: float | None = None
    load_avg_end: float | None = None
    other_cpu_share: float | None = None
    failed_rank: int | None = None
    # quality
    val_loss: float | None = None
    accuracy: float | None = None
    token_accuracy: float | None = None
    final_train_loss: float | None = None
    loss_curve: list[LossPoint] = []
    val_curve: list[ValPoint] = []
    diverged_at_step: int | None = None  # outcome `diverged`: the step whose loss said so
    # economy: (the flow's) `quality` trained the class to the end, `speed` its speed steps; a
    # speed cell's quality (validation, accuracy, curves) is `quality_from`'s, its own curve
    # is `speed_curve`
    economy_role: str | None = None
    quality_class: str | None = None
    quality_from: str | None = None
    speed_curve: list[LossPoint] = []
    # time and goodput
    train_s: float | None = None
    eval_s: float | None = None
    checkpoint_s: float | None = None
    epochs: float | None = None
    target_loss: float | None = None
    time_to_target_s: float | None = None
    tokens_to_target: float | None = None
    steps_to_target: int | None = None
    adapter_dir: str | None = None
    trainer_wall_s: float | None = None
    # filled in by the launcher (this node's view of the launch) and the flow
    stopped_after_steps: int | None = None
    wall_s: float | None = None
    queued_s: float | None = None
    overhead_s: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    exit_code: int | None = None
    cores: list[int] | None = None
    node_rank: int | None = None
    out_dir: str | None = None
    cost_usd: float | None = None
    # compute: sagemaker: the cell's training job, and what SageMaker billed (seconds per
    # instance; managed spot bills less than it ran: spot_savings = 1 - billable / training).
    # compute: slurm: the job's id, name, state at the end (COMPLETED, TIMEOUT, ...) and nodes.
    job_name: str | None = None
    job_arn: str | None = None
    job_id: str | None = None
    job_nodes: str | None = None
    job_status: str | None = None  # status/secondary status at the end, e.g. Failed/Failed
    billable_s: float | None = None
    spot_savings: float | None = None

    def update(self, **values: Any) -> CellMetrics:
        """Set several names at once (each checked like an attribute)."""
        for key, value in values.items():
            setattr(self, key, value)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a Metaflow artifact, a JSON file)."""
        return self.model_dump()

    def write(self, path: Path, first_wins: bool = False) -> bool:
        return write_json_atomic(Path(path), self.to_dict(), first_wins=first_wins)

    @classmethod
    def read(cls, path: Path) -> CellMetrics | None:
        """The metrics in `path`; None where there are none (not written, cut short). A file that
        does not match the contract raises, naming the keys."""
        try:
            data = json.loads(Path(path).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "metrics") -> CellMetrics:
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ValueError(f"{source} does not match the metrics contract: {exc}") from None


FIELDS: tuple[str, ...] = tuple(CellMetrics.model_fields)
