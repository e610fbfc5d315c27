"""The one typed schema of a matrix and of a cell.

A matrix YAML is validated here before any compute: pydantic collects every problem at once,
and `ConfigError` renders each with its key path, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
)

Peft = Literal["full", "lora", "qlora", "dora"]
Strategy = Literal[
    "single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload",
    "tensor", "pipeline", "hybrid",
]
Precision = Literal["fp32", "fp16-mixed", "bf16-mixed", "bf16-true"]
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
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )


class TrainSettings(Strict):
    """Settings every cell of a matrix shares."""

    max_steps: PositiveInt = 20
    # Steps excluded from throughput (compile, allocator and cache warm-up); reported apart.
    timing_warmup_steps: int = Field(2, ge=0)
    lr_warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="0: evaluate only at the end")
    timeout_s: PositiveFloat = 1800.0
    lora: LoraSettings = Field(default_factory=LoraSettings)


class DataSettings(Strict):
    # synthetic: majority letter of a string (learnable fast); synthetic-reverse: reverse it.
    task: Literal["synthetic", "synthetic-reverse"] = "synthetic"
    train_samples: PositiveInt = 2048
    val_samples: PositiveInt = 128
    seed: int = 1234


def _as_list(value: Any) -> Any:
    """An axis may be written as a single value or a list of values."""
    if value is None:
        return value
    return value if isinstance(value, (list, tuple)) else [value]


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

    _axis_lists = field_validator(*AXES, mode="before")(lambda cls, v: _as_list(v))


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

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus

    @property
    def global_batch(self) -> int:
        return self.world_size * self.micro_batch * self.grad_accum


class ConfigError(ValueError):
    """Every problem of a config, each on its own line, raised before any compute."""

    def __init__(self, problems: list[str], source: str = "matrix"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


def key_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not part.startswith("function-") and "[" not in part:
            path += f".{part}" if path else str(part)
    return path or "<top>"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at the parent of `loc` (walks nested models by field name)."""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
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


def _near(name: str, allowed: list[str]) -> list[str]:
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
            near = _near(str(loc[-1]), allowed)
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
            problems.append(f"{path}: {value!r} is invalid: {err['msg'].lower()}")
    return problems


def validate(model: type[BaseModel], data: Any, source: str) -> BaseModel:
    if not isinstance(data, dict):
        raise ConfigError([f"<top>: expected a mapping of keys, got {type(data).__name__}"], source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, model), source) from None
