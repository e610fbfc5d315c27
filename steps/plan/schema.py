"""The one typed schema of a matrix and of a cell.

A matrix YAML is validated here before any compute: pydantic collects every problem at once,
and `ConfigError` renders each with its key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from steps.plan.credentials import redact, take_credentials
from steps.plan.layout import ParallelLayout

Peft = Literal["full", "lora", "qlora", "dora"]
Strategy = Literal[
    "single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload",
    "tensor", "pipeline", "hybrid",
]
Precision = Literal["fp32", "fp16-mixed", "bf16-mixed", "bf16-true"]
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head
Outcome = Literal["ok", "oom", "error", "timeout", "hang", "skipped"]

PEFT_METHODS: tuple[str, ...] = get_args(Peft)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
PRECISIONS: tuple[str, ...] = get_args(Precision)

# The axes of a matrix, in the order they appear in cell ids and result columns.
AXES: tuple[str, ...] = (
    "models", "peft", "strategy", "instance", "nodes", "gpus",
    "lr", "micro_batch", "grad_accum", "precision", "seq_len",
)
# Matrix axis name -> cell field name (the only plural is `models`).
AXIS_FIELD = {axis: ("model" if axis == "models" else axis) for axis in AXES}


class Strict(BaseModel):
    """Unknown keys are errors, values are immutable once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(Strict):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # PEFT's conventions: unset, PEFT's default for the architecture (all-linear where PEFT has
    # none); a list of module names (a name matches itself and any module ending in .name);
    # "all-linear" (every linear layer but the output head); any other string is a regular
    # expression matched against the full module name.
    target_modules: list[str] | str | None = Field(None, min_length=1)

    @field_validator("target_modules")
    @classmethod
    def _regex_compiles(cls, value: Any) -> Any:
        if isinstance(value, str) and value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not 'all-linear' and not a regular expression ({exc})") from None
        return value


class QLoraSettings(Strict):
    """bitsandbytes 4-bit base weights (QLoRA)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # auto: bf16 where the precision is bf16, fp16 for fp16-mixed, fp32 otherwise.
    compute_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The dtype the packed 4-bit weights are stored in; sharding strategies (fsdp, zero3) need
    # a float storage so that every parameter of a shard has one dtype. auto picks for you.
    quant_storage: Literal["auto", "uint8", "fp32", "bf16", "fp16"] = "auto"


class ParallelSettings(Strict):
    """How model-parallel strategies split the model."""

    # hybrid: data parallel across groups of `model_parallel` ranks that run `hybrid_inner`.
    hybrid_inner: Literal["tensor", "pipeline"] = "pipeline"
    model_parallel: PositiveInt = 2
    pipeline_schedule: Literal["gpipe", "1f1b"] = "1f1b"


class FaultSettings(Strict):
    """Make a cell fail on purpose, to test what the tool does with failures."""

    kind: Literal["raise", "oom", "hang", "kill"]
    at_step: PositiveInt = 1
    rank: int = Field(0, ge=0)


class TrainSettings(Strict):
    """Settings every cell of a matrix shares."""

    max_steps: PositiveInt = 20
    # When set, the run lasts this many passes over the training split instead of max_steps.
    epochs: PositiveFloat | None = None
    # Steps excluded from throughput (compile, allocator and cache warm-up); reported apart.
    timing_warmup_steps: int = Field(2, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    optimizer: Literal["adamw", "paged_adamw_8bit", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    seed: int = 0
    # Model weights: `random` builds the architecture with random weights (no download),
    # `pretrained` loads them; `auto` follows the preset (hub ids and directories: pretrained).
    init: Literal["auto", "random", "pretrained"] = "auto"
    # Where random weights are drawn: `cpu`, the same numbers on every machine (minutes for a
    # multi-billion-parameter shape); `device`, the rank's GPU (seconds; other numbers than the
    # CPU's draw). On a CPU instance both are the CPU.
    init_device: Literal["cpu", "device"] = "cpu"
    trust_remote_code: bool = False
    # auto: the model's own tokenizer (its folder's, or the preset's); byte: the built-in byte
    # tokenizer, for runs at a model's shape with random weights and nothing downloaded (the
    # vocabulary, and so the embedding and head sizes, stay the model's).
    tokenizer: Literal["auto", "byte"] = "auto"
    # auto: what transformers picks for the model (the fastest it supports and is installed).
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 sums): NVIDIA Ampere and
    # later (A10G, L4, L40S, A100, H100, H200, B200); auto: on where the device has them. It
    # changes losses (a little), so it splits equivalence classes (`steps.plan.catalog.tf32`).
    tf32: Literal["auto", "true", "false"] = "auto"
    # Fast paths. Each gives the losses of the run without it (within the tolerance its test
    # states) and is refused, with the reason, under a strategy it cannot run with.
    # The optimizer's fused kernel (one launch for all parameters); auto: on for CUDA devices.
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    # torch.compile: each decoder layer (`layers`, as torchtitan does: one graph reused by every
    # layer, recompiled for nothing) or the whole model (`model`).
    compile: Literal["off", "layers", "model"] = "off"
    # Liger Kernel's Triton kernels (CUDA only): RMSNorm, SwiGLU, rotary embeddings (and, with
    # loss: chunked, its fused linear cross-entropy).
    liger: bool = False
    # logits: the loss from the model's logits; chunked: from the final hidden states,
    # `loss_chunk` tokens at a time, each chunk's logits rebuilt in backward, so that the whole
    # b x s x V logits and their gradients never exist at once (Liger's kernel with `liger`).
    loss: Literal["logits", "chunked"] = "logits"
    loss_chunk: PositiveInt = 1024
    # LoRA's forward and backward written out (`steps.trainer.lora_kernels`): each adapted
    # projection one autograd function, a SwiGLU MLP whose three projections are adapted another,
    # keeping less for backward (PEFT's losses and gradients); lora and qlora (dropout too) on
    # modules the strategy leaves whole. auto: wherever they serve the cell, PEFT's modules
    # elsewhere; true: the same, and a LoRA model whose adapted layers they cannot compute is
    # refused; false: PEFT's modules. A LoRA cell that runs without them says why
    # (steps.plan.lora_kernels).
    lora_kernels: Literal["auto", "true", "false"] = "auto"
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    # false: no validation at all (an `economy:` speed cell, which shares its class's).
    evaluate: bool = True
    # Train only the first steps of the run, on its schedule and data order (an `economy:`
    # speed cell: its steps are the full run's first ones).
    stop_after_steps: PositiveInt | None = None
    # A run whose loss is not finite, or is this many times its first loss once the learning
    # rate has warmed up, stops at once as outcome `diverged` (a result: no retry); None: only
    # a loss that is not finite.
    diverge_factor: PositiveFloat | None = Field(3.0, gt=1.0)
    # Time and tokens until the validation loss (train loss when eval_every is 0) first
    # reaches this value: the goodput / statistical-efficiency measure.
    target_loss: PositiveFloat | None = None
    checkpoint_every: int = Field(0, ge=0, description="0: no checkpoints")
    # Cap on each rank's memory (GPU: the caching allocator; CPU: the process's data
    # segment), to find out what fits in a smaller device; exceeding it is outcome `oom`.
    memory_cap_gb: PositiveFloat | None = None
    save_adapter: bool = True
    # Run limits (kept out of the cell id): the whole cell, and the longest stretch with no
    # completed step (model loading, evaluation and checkpoints count as progress) before the
    # cell is stopped as `hang`, its Python stacks dumped into its log first.
    timeout_s: PositiveFloat = 1800.0
    hang_after_s: PositiveFloat | None = 900.0
    # What starts the processes of a multi-process cell (the same trainer either way).
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    fault: FaultSettings | None = None
    lora: LoraSettings = Field(default_factory=LoraSettings)
    qlora: QLoraSettings = Field(default_factory=QLoraSettings)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)

    @field_validator("tf32", "lora_kernels", mode="before")
    @classmethod
    def _switch_words(cls, value: Any) -> Any:
        """YAML reads true/false (and on/off) as booleans; kept as words, so that a results-table
        column of auto, true and false has one type (Parquet's rule)."""
        return str(value).lower() if isinstance(value, bool) else value


class DataSettings(Strict):
    """Where the examples come from and how they become token sequences."""

    # synthetic: majority letter of a string (learnable fast); synthetic-reverse: reverse it;
    # instructions: records with instruction/context/response (Alpaca, Dolly) or prompt/completion;
    # chat: conversations (OpenAI messages, ShareGPT conversations), loss on assistant turns;
    # classification: TSV of label and text (SST-2); text: plain text packed in blocks;
    # hub: datasets.load_dataset. Records come from JSONL, JSON or Parquet files.
    task: Literal[
        "synthetic", "synthetic-reverse", "instructions", "chat", "classification", "text", "hub"
    ] = "synthetic"
    # A file, or a folder holding a train file and a dev/validation file.
    path: str | None = None
    # hub: the dataset name (and config) for datasets.load_dataset.
    hub_name: str | None = None
    hub_config: str | None = None
    # Caps on the number of examples (synthetic: how many to generate, default 2048 / 128).
    train_samples: PositiveInt | None = None
    val_samples: PositiveInt | None = None
    # Share held out for validation when the source has no validation split of its own.
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0)
    # Concatenate examples into full seq_len rows (no padding); loss masks are kept.
    packing: bool = False
    # classification: the prompt ({text} is replaced) and the answer word of each label id.
    prompt_template: str | None = None
    labels: list[str] = Field(default_factory=lambda: ["negative", "positive"], min_length=2)
    seed: int = 1234


def _as_list(value: Any) -> Any:
    """An axis may be written as a single value or a list of values."""
    if value is None:
        return value
    return value if isinstance(value, (list, tuple)) else [value]


def _sweep_lists(value: Any) -> Any:
    return {k: _as_list(v) for k, v in value.items()} if isinstance(value, dict) else value


def _dotted_to_settings(data: Any) -> Any:
    """`train.lora.r: 64` in a pattern names a setting, not an axis: kept apart in `settings`."""
    if not isinstance(data, dict):
        return data
    dotted = {k: _as_list(v) for k, v in data.items() if isinstance(k, str) and "." in k}
    if not dotted:
        return data
    return {**{k: v for k, v in data.items() if k not in dotted}, "settings": dotted}


class CellPattern(Strict):
    """A partial cell: the axes it names, each one value or a list of values, and settings by
    their dotted names (`train.optimizer: sgd`; checked against the settings in `steps.plan.matrix`)."""

    models: list[str] | None = None
    peft: list[Peft] | None = None
    strategy: list[Strategy] | None = None
    instance: list[str] | None = None
    nodes: list[PositiveInt] | None = None
    gpus: list[PositiveInt] | None = None
    lr: list[PositiveFloat] | None = None
    micro_batch: list[PositiveInt] | None = None
    grad_accum: list[PositiveInt] | None = None
    precision: list[Precision] | None = None
    seq_len: list[PositiveInt] | None = None
    settings: dict[str, list[Any]] = Field(default_factory=dict)

    _axis_lists = field_validator(*AXES, mode="before")(lambda cls, v: _as_list(v))
    _dotted = model_validator(mode="before")(lambda cls, data: _dotted_to_settings(data))

    def axes(self) -> dict[str, list]:
        return {a: getattr(self, a) for a in AXES if getattr(self, a) is not None}


class IncludeRule(CellPattern):
    """Cells to add; axes left out take every value of the matrix. `train` and `data` are
    changes to the shared sections for these cells only (merged key by key)."""

    train: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    # Variants of these cells at other settings (`{train.optimizer: [sgd]}` adds the SGD cell
    # beside the existing one); over the matrix's own sweep.
    sweep: dict[str, list[Any]] | None = None

    _sweep_lists = field_validator("sweep", mode="before")(lambda cls, v: _sweep_lists(v))


class PlanSettings(Strict):
    """What the planner (`python -m steps.plan`) does before a run: cells it predicts will not
    fit become `skipped` rows with the estimate as the reason; a matrix whose cells are
    predicted to cost or take more than a budget is refused before anything runs."""

    skip_predicted_oom: bool = False
    # A cell predicted to need over twice the memory it may use is refused before launch with the
    # estimate (`skip_predicted_oom` is for the close calls); true: launch it anyway.
    try_predicted_oom: bool = False
    max_cost_usd: PositiveFloat | None = None
    max_hours: PositiveFloat | None = None
    # Time this machine's cells (local CPU types, local-gpu) with a probe of a few seconds each
    # before planning them (cached per machine and library versions); false: the catalog's peaks.
    probe: bool = True
    # Rehearse the flow: every cell goes through its launch, train and gather tasks to its
    # results row (outcome `skipped`, "dry run") without starting its trainer (and with no card).
    dry_run: bool = False


class MlflowTrack(Strict):
    """An MLflow tracking server (or a `file:`/`sqlite:` store): a parent run per matrix run,
    the cells as its children."""

    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)

    @field_validator("tracking_uri")
    @classmethod
    def _credentials_out(cls, value: str) -> str:
        """`user:***@` kept, the credentials moved into MLflow's variables (`steps.plan.credentials`)."""
        return take_credentials(value)


class WandbTrack(Strict):
    """A Weights & Biases project: one run per cell, grouped by the matrix run. `offline` keeps
    the run files in the cell's folder (`wandb sync` uploads them); `disabled` logs nothing."""

    project: str = Field(min_length=1)
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] = "online"


class TensorboardTrack(Strict):
    """Event files under `dir`/<run id>/<cell id> (relative paths: from the checkout)."""

    dir: str = Field(min_length=1)


class TrackSettings(Strict):
    """The trackers each cell logs to while it trains (any of the three, or none): its settings
    as parameters, its curves at their steps, its final metrics under the results table's names."""

    mlflow: MlflowTrack | None = None
    wandb: WandbTrack | None = None
    tensorboard: TensorboardTrack | None = None

    def any(self) -> bool:
        return any((self.mlflow, self.wandb, self.tensorboard))


class TrackContext(Strict):
    """What the flow tells a cell's trackers: the matrix run it belongs to (set by `start`)."""

    run_id: str
    pathspec: str = ""
    git_commit: str | None = None
    mlflow_parent: str | None = None  # the MLflow parent run's id
    mlflow_experiment_id: str | None = None


class EconomySettings(Strict):
    """Pay once per answer. Every cell trains `speed_steps` steps (tokens/s, MFU, memory, step
    time); with `quality: shared` each equivalence class (cells whose losses the strategy
    equivalence makes the same: `steps/plan/equivalence.py`) trains to the end once, on the
    member the planner predicts cheapest, and its other members share that run's validation
    loss, accuracy and curves. `quality: every` trains every cell to the end (no sharing)."""

    speed_steps: PositiveInt = 30
    quality: Literal["shared", "every"] = "shared"
    # Also validate the speed cells (at their last step): their own numbers beside the shared ones.
    evaluate_speed_cells: bool = False


# A container image reference as Docker and OCI registries parse it (distribution's reference
# grammar): [registry[:port]/]path[/path...][:tag][@digest]. A first part is a registry when it has
# a dot or a port, or is localhost (Docker's rule); otherwise it is a lower-case path.
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:localhost(?::[0-9]+)?|{_LABEL}(?:\.{_LABEL})+(?::[0-9]+)?|{_LABEL}:[0-9]+)"
_PATH = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_REFERENCE = re.compile(
    rf"^(?:{_DOMAIN}/)?{_PATH}(?:/{_PATH})*(?::[\w][\w.-]{{0,127}})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$")

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class RemoteSettings(Strict):
    """What remote compute needs beyond the instance catalog's facts: Metaflow's @kubernetes /
    @batch, or SageMaker training jobs (`compute: sagemaker`, one job per cell)."""

    # kubernetes/batch: required (the project's image, `make image`). sagemaker: default the AWS PyTorch
    # training image (Deep Learning Container) of the installed torch's version, or the newest
    # one before it, for the region and instance type.
    image: str | None = None
    queue: str | None = None  # batch: the AWS Batch job queue

    @field_validator("image")
    @classmethod
    def _image_reference(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 255 or not IMAGE_REFERENCE.match(value)):
            raise ValueError("not an image reference: [registry[:port]/]name[:tag][@digest], e.g. "
                             "123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-matrix:0.1.0")
        return value

    namespace: str | None = None  # kubernetes
    service_account: str | None = None  # kubernetes
    # Node label that selects the instance type (kubernetes); the value is the instance name.
    node_selector_label: str = "node.kubernetes.io/instance-type"
    shared_memory_mb: PositiveInt | None = None  # /dev/shm for NCCL and data loaders
    disk_mb: PositiveInt | None = None
    # --- sagemaker ---
    # The IAM role the jobs run as; default $FINETUNE_MATRIX_SAGEMAKER_ROLE, then $SAGEMAKER_ROLE,
    # then the SDK's own resolution (SageMaker config file, the caller's role).
    role: str | None = Field(None, pattern=r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-_/]+$")
    region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d$")  # default: the AWS profile's
    # Where code, outputs and checkpoints go: s3://bucket/prefix. Default: the session's default
    # bucket (sagemaker-<region>-<account>), prefix finetune-matrix.
    s3_prefix: str | None = Field(None, pattern=r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
    spot: bool = False  # managed spot training: checkpoints carry a job across interruptions
    max_wait_s: PositiveInt | None = None  # spot: run + wait for capacity; default 2x the run limit
    volume_gb: PositiveInt = Field(100, le=16384)  # EBS per instance: model, data, checkpoints
    # SageMaker warm pools: an instance stays this long after its job, so the next cell of the
    # same type starts in seconds instead of minutes (needs a warm-pool quota; max 3600).
    keep_alive_s: int = Field(0, ge=0, le=3600)
    subnets: list[str] = Field(default_factory=list, max_length=16)  # VPC: both or neither
    security_groups: list[str] = Field(default_factory=list, max_length=5)
    tags: dict[str, str] = Field(default_factory=dict, max_length=50)
    # Beyond the cell's timeout_s, what a job may spend starting (image pull, installs, model
    # download) before SageMaker stops it (MaxRuntimeInSeconds = timeout_s + this; Slurm: --time).
    startup_allowance_s: PositiveInt = 1800
    poll_s: PositiveFloat = 15.0  # how often the train step asks SageMaker (or Slurm) how its job is doing
    # Variables of the machine that starts the flow each cell's job gets, by name (a token, the
    # tracker's credentials): no other value of this environment reaches a job. (Kubernetes and
    # Batch tasks are Metaflow's: its secrets give them variables by name, docs/remote.md.)
    env: list[str] = Field(default_factory=list, max_length=64)
    # --- slurm (docs/slurm.md): each cell one batch job, submitted from the machine that runs
    # the flow (a login node) with sbatch; the cell's folder must be on a filesystem the nodes share.
    partition: str | None = Field(None, pattern=r"^[\w.,-]+$")
    account: str | None = Field(None, pattern=r"^[\w.-]+$")
    qos: str | None = Field(None, pattern=r"^[\w.-]+$")
    # The job's time limit (--time); default train.timeout_s + startup_allowance_s. The cell's own
    # timeout_s ends it `timeout` with its curve first; Slurm's limit is the backstop.
    time_limit_s: PositiveInt | None = None
    # GPUs per node as a generic resource, {gpus} the cell's processes per node: "gpu:{gpus}" or
    # "gpu:a100:{gpus}". Default "gpu:{gpus}" for GPU instance types, none for CPU ones.
    gres: str | None = Field(None, pattern=r"^[\w:{},.-]+$")
    cpus_per_node: PositiveInt | None = None  # default: the instance's vCPUs (CPU types: a core per process)
    mem_gb: PositiveFloat | None = None  # per node; default: 90% of the instance's memory, where known
    # Lines run before the launch on every node: `module load cuda/12.4`, `source ~/venv/bin/activate`,
    # `export NCCL_SOCKET_IFNAME=ib0`.
    setup: list[str] = Field(default_factory=list, max_length=64)
    sbatch: list[str] = Field(default_factory=list, max_length=64)  # extra options: "--constraint=a100"
    # With `image`: the runtime that runs it on the nodes (pyxis/enroot's srun --container-image,
    # or apptainer exec). Without an image the nodes run the flow's own checkout and Python.
    container: Literal["pyxis", "apptainer"] | None = None
    # The nodes' interpreter; default the `python` that `setup` makes, else the flow's own (a venv
    # on the shared filesystem).
    python: str | None = None
    # What a GPU-hour costs on this cluster (your allocation's rate): the plan and the results price
    # cells with it; without it their cost is unknown (the catalog's cloud prices do not apply).
    price_per_gpu_hour: PositiveFloat | None = None

    @field_validator("sbatch")
    @classmethod
    def _sbatch_options(cls, value: list[str]) -> list[str]:
        if bad := [v for v in value if not v.startswith("-") or "\n" in v]:
            raise ValueError(f"not sbatch options: {', '.join(map(repr, bad))} (one option a line, e.g. "
                             "'--constraint=a100' or '--exclusive')")
        return value

    @field_validator("gres")
    @classmethod
    def _gres_template(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                value.format(gpus=1)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"the only placeholder is {{gpus}} (the cell's processes per node), "
                                 f"not {exc}") from None
        return value

    @field_validator("env")
    @classmethod
    def _variable_names(cls, value: list[str]) -> list[str]:
        if bad := [v for v in value if not ENV_NAME.match(v)]:
            raise ValueError(f"not variable names: {', '.join(map(repr, bad))} (letters, digits and _, "
                             "not starting with a digit)")
        return list(dict.fromkeys(value))


# Which remote keys each compute reads; a key set for another compute is reported.
REMOTE_KEYS = {
    "kubernetes": {"image", "namespace", "service_account", "node_selector_label", "shared_memory_mb", "disk_mb"},
    "batch": {"image", "queue", "shared_memory_mb"},
    "sagemaker": {"image", "role", "region", "s3_prefix", "spot", "max_wait_s", "volume_gb", "keep_alive_s",
                  "subnets", "security_groups", "tags", "startup_allowance_s", "poll_s", "env"},
    "slurm": {"image", "partition", "account", "qos", "time_limit_s", "gres", "cpus_per_node", "mem_gb", "setup",
              "sbatch", "container", "python", "price_per_gpu_hour", "startup_allowance_s", "poll_s"},
}


# What a goal may minimise or maximise (steps/report/decision.py works each out from a results row).
Objective = Literal["val_loss", "accuracy", "time_to_target_s", "cost_to_target_usd", "wall_s", "cost_usd",
                    "tokens_per_s", "tokens_per_usd", "peak_mem_gb"]
GOAL_CONSTRAINTS = ("max_mem_gb", "max_cost_usd", "max_wall_s", "max_val_loss", "min_accuracy", "target_loss")


class Goal(Strict):
    """One question the run's decision answers: an objective to minimise or maximise over the
    cells that meet the constraints (`steps/report/decision.py`)."""

    name: str = Field(min_length=1)
    minimize: Objective | None = None
    maximize: Objective | None = None
    max_mem_gb: PositiveFloat | None = None
    max_cost_usd: PositiveFloat | None = None
    max_wall_s: PositiveFloat | None = None
    max_val_loss: PositiveFloat | None = None
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0)
    # time_to_target_s / cost_to_target_usd to this loss (else the run's train.target_loss)
    target_loss: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_objective(self) -> Goal:
        if (self.minimize is None) == (self.maximize is None):
            raise ValueError("a goal has one objective: set minimize or maximize (not both)")
        return self

    @property
    def objective(self) -> str:
        return self.minimize or self.maximize  # type: ignore[return-value]

    def constraints(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in GOAL_CONSTRAINTS if getattr(self, k) is not None}


class ReportSettings(Strict):
    """What the report adds beyond this run's cells."""

    # A matrix file (relative to the repository root, or absolute) whose cells the report plans
    # without a GPU: the decision this run's goals would reach at full scale, predicted.
    project_to: str | None = Field(None, min_length=1)


class MatrixSpec(Strict):
    """A matrix file: axes (each a list), shared settings, and pruning rules."""

    name: str = Field(min_length=1)
    description: str = ""
    models: list[str] = Field(min_length=1)
    peft: list[Peft] = Field(min_length=1)
    strategy: list[Strategy] = Field(min_length=1)
    instance: list[str] = Field(default_factory=lambda: ["local-cpu"], min_length=1)
    nodes: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    gpus: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    lr: list[PositiveFloat] = Field(min_length=1)
    micro_batch: list[PositiveInt] = Field(default_factory=lambda: [4], min_length=1)
    grad_accum: list[PositiveInt] = Field(default_factory=lambda: [1], min_length=1)
    precision: list[Precision] = Field(default_factory=lambda: ["fp32"], min_length=1)
    seq_len: list[PositiveInt] = Field(default_factory=lambda: [128], min_length=1)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    # Cells matching any of these partial cells are dropped; `include` adds cells (or changes
    # the train/data settings of cells already in the matrix).
    exclude: list[CellPattern] = Field(default_factory=list)
    include: list[IncludeRule] = Field(default_factory=list)
    # Settings multiplied like axes, by their dotted names: {train.lora.r: [8, 16, 64]}.
    sweep: dict[str, list[Any]] = Field(default_factory=dict)
    # Where the train step runs: here, on Metaflow's @kubernetes / @batch with resources from
    # the instance catalog (one instance type per run), as one SageMaker training job per
    # cell (any instance type SageMaker offers, several per run), or as one Slurm job per cell.
    compute: Literal["local", "kubernetes", "batch", "sagemaker", "slurm"] = "local"
    remote: RemoteSettings = Field(default_factory=RemoteSettings)
    # A real failure (an exception in the trainer, a lost node) is retried this many times,
    # then fails the run (`on_error: fail`, so that `resume` re-runs only the failed cells)
    # or becomes a row with outcome `error` (`on_error: record`).
    retries: int = Field(1, ge=0, le=4)
    on_error: Literal["fail", "record"] = "fail"
    plan: PlanSettings = Field(default_factory=PlanSettings)
    # Short speed cells and one quality run per equivalence class; None: every cell to the end.
    economy: EconomySettings | None = None
    # MLflow, Weights & Biases, TensorBoard: where each cell logs while it trains.
    track: TrackSettings = Field(default_factory=TrackSettings)
    # The questions the report's decision answers; none: the default goals (steps/report/decision.py).
    goals: list[Goal] = Field(default_factory=list)
    # Every cell N times, with seeds train.seed .. train.seed+N-1 (a `repeat` column): the
    # decision then compares configurations on their repeats' means and spread.
    repeats: PositiveInt = Field(1, le=100)
    # The report's extras: `project_to`, a full-scale matrix whose plan answers the goals too.
    report: ReportSettings = Field(default_factory=ReportSettings)

    @field_validator("goals")
    @classmethod
    def _goal_names_differ(cls, goals: list[Goal]) -> list[Goal]:
        names = [g.name for g in goals]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"goal names must differ: {', '.join(twice)} appear(s) more than once")
        return goals

    _axis_lists = field_validator(*AXES, mode="before")(lambda cls, v: _as_list(v))
    _sweep_lists = field_validator("sweep", mode="before")(lambda cls, v: _sweep_lists(v))


class CellSpec(Strict):
    """One point of the matrix: what the trainer reads from `--cell CELL.yaml`."""

    cell_id: str
    matrix: str = ""
    model: str
    peft: Peft
    strategy: Strategy
    instance: str = "local-cpu"
    nodes: PositiveInt = 1
    gpus: PositiveInt = 1
    lr: PositiveFloat
    micro_batch: PositiveInt
    grad_accum: PositiveInt = 1
    precision: Precision = "fp32"
    seq_len: PositiveInt
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    # Which of the matrix's `repeats` this is (its seed is train.seed + repeat; not part of its id).
    repeat: int = Field(0, ge=0)
    # Where it logs while it trains, and the matrix run it belongs to (not part of its id).
    track: TrackSettings = Field(default_factory=TrackSettings)
    track_context: TrackContext | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus

    @property
    def layout(self) -> ParallelLayout:
        """How the ranks share the work (replicas, model split, sharding): ask it, not the strategy."""
        p = self.train.parallel
        return ParallelLayout.of(self.strategy, self.world_size, p.hybrid_inner, p.model_parallel)

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model between them (tensor or pipeline group)."""
        return self.layout.mp_size

    @property
    def dp_size(self) -> int:
        """Model replicas, each fed its own slice of the global batch."""
        return self.layout.dp_size

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step. Tensor and pipeline ranks share their samples."""
        return self.dp_size * self.micro_batch * self.grad_accum


@dataclass(frozen=True)
class PlannedCell:
    """A cell as planning leaves it: what runs, or why it cannot (then a `skipped` row)."""

    cell: CellSpec
    refused: str | None = None
    # Under `economy:`, what the cell is for: `quality` trains its class to the end, `speed`
    # trains `speed_steps` and shares `quality_from`'s validation; `quality_class` names the
    # class. None without `economy:` (every cell trains to the end for itself).
    role: str | None = None
    quality_class: str | None = None
    quality_from: str | None = None
    speed_steps: int | None = None  # a speed cell's steps (its settings stay the configuration's)
    evaluate_speed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data, so artifacts read back without this package installed."""
        out: dict[str, Any] = {"cell": self.cell.model_dump(mode="json"), "refused": self.refused}
        if self.role is not None:
            out["economy"] = {"role": self.role, "quality_class": self.quality_class,
                              "quality_from": self.quality_from, "speed_steps": self.speed_steps,
                              "evaluate_speed": self.evaluate_speed}
        return out


class ConfigError(ValueError):
    """Every problem of a config, each on its own line, raised before any compute."""

    def __init__(self, problems: list[str], source: str = "matrix"):
        self.problems = [redact(p) for p in problems]  # a bad value is quoted: never a URI's password
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("function-") and "[" not in part:
            path += f".{part}" if path else str(part)
    return path or "<top>"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds: itself, in a list (`goals`), or optional (`economy`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at the parent of `loc` (walks nested models by field name)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _model_in(getattr(field, "annotation", None))
        if inner is None:
            return []
        model = inner
    return sorted(model.model_fields)


# Names other tools use for our keys, for "did you mean" hints.
ALIASES = {
    "learning_rate": "lr", "model": "models", "method": "peft", "methods": "peft",
    "strategies": "strategy", "instances": "instance", "instance_type": "instance",
    "batch_size": "micro_batch", "per_device_train_batch_size": "micro_batch",
    "gradient_accumulation_steps": "grad_accum", "num_gpus": "gpus", "num_nodes": "nodes",
    "max_seq_length": "seq_len", "seq_length": "seq_len", "steps": "max_steps",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
}


def near_key(name: str, allowed: list[str]) -> list[str]:
    """The allowed key the user most likely meant: a known alias, a close spelling, a prefix."""
    if ALIASES.get(name) in allowed:
        return [ALIASES[name]]
    close = difflib.get_close_matches(name, allowed, n=1)
    return close or [a for a in allowed if name.startswith(a) or a.startswith(name)][:1]


def describe_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    """One line per problem: key path, bad value, what is allowed."""
    problems = []
    for err in exc.errors():
        loc, kind, value = err["loc"], err["type"], err.get("input")
        path = key_path(loc)
        if kind == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            near = near_key(str(loc[-1]), allowed)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            problems.append(
                f"{path}: unknown key{hint}; allowed keys: {', '.join(allowed)}"
            )
        elif kind == "literal_error":
            problems.append(
                f"{path}: {value!r} is not allowed; allowed values: "
                f"{err['ctx']['expected'].replace(' or ', ', ')}"
            )
        elif kind == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")  # a validator's own sentence, as it wrote it
            problems.append(f"{path}: {value!r} is invalid: {msg[:1].lower() + msg[1:]}")
    return problems


def validate(model: type[BaseModel], data: Any, source: str) -> BaseModel:
    if not isinstance(data, dict):
        raise ConfigError([f"<top>: expected a mapping of keys, got {type(data).__name__}"], source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, model), source) from None
