"""Know before you spend: every cell's memory per rank, whether it fits, the cheapest change
that makes it fit, and its step time, throughput, wall time and cost; no torch.

    python -m steps.plan configs/matrix/study4-litgpt-memory.yaml

Memory is the report's model (`steps.plan.memory`, activations from `steps.plan.activations`)
plus what a strategy's framework allocates beside the training state (DeepSpeed's buckets,
FSDP's gathered layers) and the runtime (CUDA context and cuBLAS workspace on a GPU, the
libraries on a CPU). Time is FLOPs per token (the report's convention) over the device's peak
times an efficiency for the strategy, plus the communication a step needs over the catalog's
links (overlapped with compute where the strategy overlaps it), a pipeline's bubble, and
gradient checkpointing's recomputed forward.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from steps.plan import catalog, memory, params
from steps.plan.activations import DecoderShape
from steps.plan.schema import CellSpec
from steps.plan.settings import flatten

GB = 1e9
# Model-FLOPs utilisation a strategy reaches on a GPU at a sensible batch (defaults; calibrated
# from measured runs, see `steps.plan.calibrate`).
DEFAULT_EFFICIENCY = {"single": 0.35, "ddp": 0.33, "zero1": 0.32, "zero2": 0.32, "fsdp": 0.30, "zero3": 0.28,
                      "zero3_offload": 0.08, "tensor": 0.25, "pipeline": 0.33, "hybrid": 0.27}
QLORA_SPEED = 0.6  # bitsandbytes dequantizes every 4-bit weight each pass
CPU_CORE_TFLOPS = 0.05  # a nominal CPU core (no datasheet peak): calibration sets the scale
# CUDA context + cuBLAS workspace; a CPU process's libraries (the trainer measures its own:
# metrics' runtime_baseline_gb)
RUNTIME_GB = {"gpu": 0.6, "cpu": 0.5}
STARTUP_S = {"gpu": 60.0, "cpu": 10.0}  # process start, model load, rendezvous
TIGHT = 0.9  # above this share of the device's memory a cell is "tight"
# Collective bandwidth a ring reaches of the link's stated figure.
LINK_EFFICIENCY = 0.4
CPU_LINK_BYTES_S = 2e9  # gloo over shared memory
DDP_BROADCAST_BUCKET = 250 * 2**20  # bytes: torch's DDP syncs the weights at start in buckets this size
ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance, which the trainer keeps


@dataclass(frozen=True)
class CellPlan:
    """What the planner predicts for one cell."""

    cell_id: str
    memory_gb: dict[str, float] = field(default_factory=dict)  # per rank, by part
    device_gb: float | None = None  # what one rank may use (the device, or the cell's cap)
    verdict: str = "?"  # fits, tight, will not fit; ? where the model or device is unknown
    fix: str | None = None  # the cheapest change that makes a cell that will not fit fit
    step_s: float | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    cost_usd: float | None = None
    note: str | None = None  # why a prediction is missing
    load_gb: float | None = None  # per rank while the model loads, before any sharding
    step_gb: float | None = None  # per rank at DeepSpeed's optimizer step, where it exceeds training

    @property
    def total_gb(self) -> float | None:
        """Per rank while training."""
        return sum(self.memory_gb.values()) if self.memory_gb else None

    @property
    def peak_gb(self) -> float | None:
        """Per rank at the largest of loading, training and the optimizer step."""
        if self.total_gb is None:
            return None
        return max(self.total_gb, self.load_gb or 0.0, self.step_gb or 0.0)

    def reason(self) -> str:
        """The sentence a predicted out-of-memory `skipped` row carries."""
        fix = f"; fits with {self.fix}" if self.fix else ""
        if self.step_gb and self.step_gb == self.peak_gb > self.total_gb:
            return (f"predicted out of memory at the optimizer step: {self.step_gb:.1f} GB per rank > "
                    f"{self.device_gb:.1f} GB (the training state, DeepSpeed's fp32 copy of the gradients "
                    f"and the optimizer's temporaries over its flat partition){fix}")
        if self.load_gb and self.load_gb > self.total_gb:
            return (f"predicted out of memory while loading: {self.load_gb:.1f} GB per rank > {self.device_gb:.1f} GB "
                    f"(the whole model on every rank before it is sharded; training would need "
                    f"{self.total_gb:.1f} GB){fix}")
        return (f"predicted out of memory: {self.total_gb:.1f} GB per rank > {self.device_gb:.1f} GB"
                f" ({', '.join(f'{k} {v:.1f}' for k, v in self.memory_gb.items())}){fix}")


def arch_of(cell: CellSpec, facts: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The model's shape: the preset's config, or what the model's facts read."""
    preset = catalog.model_presets().get(cell.model)
    if preset and preset.config:
        return preset.config
    entry = (facts or {}).get(cell.model) or {}
    return entry.get("arch")


def _device_kind(cell: CellSpec) -> str:
    entry = catalog.instances().get(cell.instance)
    return "cpu" if entry is None or entry.accelerator == "cpu" else "gpu"


def device_memory_gb(cell: CellSpec) -> float | None:
    """What one rank may hold: the cell's `memory_cap_gb`, else its GPU's memory, else (CPU) this
    machine's memory shared by the cell's processes."""
    entry = catalog.instances().get(cell.instance)
    limits = [cell.train.memory_cap_gb] if cell.train.memory_cap_gb else []
    if entry is not None and entry.memory_per_device_gb:
        limits.append(entry.memory_per_device_gb)
    elif entry is not None and entry.accelerator == "cpu" and not limits:
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB / cell.world_size)
        except (ValueError, OSError):
            pass
    return min(limits) if limits else None


def _row(cell: CellSpec, counts: params.ParamCounts) -> dict[str, Any]:
    top = cell.model_dump(mode="json", exclude={"train", "data"})
    return {**top, **flatten(cell), "world_size": cell.world_size, "total_params": counts.total,
            "trainable_params": counts.trainable}


def buffers_bytes(cell: CellSpec, shape: DecoderShape, counts: params.ParamCounts, whole_weights: float) -> float:
    """What a strategy's framework holds beside the training state, per rank: DeepSpeed's
    reduce bucket (the model's h^2 fp32 elements, as the trainer sizes it) and, under ZeRO-1/2,
    the all-gather of updated parameters; FSDP's and ZeRO-3's gathered layers (the current one
    and the prefetched next, in the compute width) and a layer's reduce-scattered gradients;
    FSDP's root unit, gathered. ZeRO-3 also keeps gathered every parameter used again within
    `stage3_max_reuse_distance` elements: from the end of the forward pass into the backward
    pass (which reuses the last layers first), the last layers up to half that distance
    (`whole_weights`: the unsharded weights' bytes, for QLoRA's 4-bit width)."""
    layout = cell.layout
    width = 4 if cell.precision == "fp32" else 2
    layer = sum(a * b for a, b in shape.linears().values()) + 2 * shape.hidden
    trainable_layer = counts.trainable / max(shape.layers, 1)
    if layout.zero_stage in (1, 2):
        return 4 * shape.hidden ** 2 + min(5e8, counts.trainable) * width
    if layout.zero_stage == 3:
        # in DeepSpeed's 16-bit cast; QLoRA's 4-bit layers as stored
        per_param = whole_weights / counts.total if cell.peft == "qlora" and counts.total else width
        kept = min(counts.total, ZERO3_REUSE_DISTANCE / 2) * per_param
        return 2 * layer * width + 4 * shape.hidden ** 2 + kept
    if cell.strategy == "fsdp":
        # The root unit (embeddings, final norm, untied head) is not resharded after the
        # forward pass: gathered from the forward pass through the backward pass.
        root = shape.vocab * shape.hidden * (1 if shape.tied else 2) + shape.hidden
        root_width = 4 if cell.precision == "fp32" or cell.peft == "qlora" or (
            cell.peft == "full" and cell.precision != "bf16-true") else 2
        return 2 * layer * width + 4 * trainable_layer + root * root_width * (1 - 1 / layout.dp_size)
    return 0.0


def memory_parts(cell: CellSpec, arch: dict[str, Any], counts: params.ParamCounts,
                 whole_weights: float) -> dict[str, float]:
    """GB per rank: weights, gradients, optimizer states, activations, framework buffers,
    runtime (`whole_weights`: `whole_weights_bytes` of the cell)."""
    parts = memory.estimate(_row(cell, counts), arch)
    shape = DecoderShape.of(arch)
    if cell.layout.model_split == "pipeline":
        # In flight on the first stage: every micro-batch under GPipe, one per stage under 1F1B.
        m, p = cell.grad_accum, cell.layout.mp_size
        gpipe = cell.train.parallel.pipeline_schedule == "gpipe" or m < p
        parts["activations"] *= m if gpipe else min(p, m)
    out = {k: v / GB for k, v in parts.items()}
    out["buffers"] = buffers_bytes(cell, shape, counts, whole_weights) / GB
    out["runtime"] = RUNTIME_GB[_device_kind(cell)]
    return out


def whole_weights_bytes(cell: CellSpec, arch: dict[str, Any], counts: params.ParamCounts) -> float:
    """Bytes of the model's weights unsharded, as the cell stores them."""
    return memory.estimate({**_row(cell, counts), "strategy": "single", "world_size": 1}, arch)["weights"]


def load_gb(cell: CellSpec, counts: params.ParamCounts, whole_weights: float) -> float:
    """Per rank while the model loads: every strategy but tensor parallelism (which loads its
    shard) first puts the whole model on each rank's device, in its stored dtype, then shards or
    splits it; random weights are drawn in fp32 on the CPU first, which a CPU rank's resident
    set keeps as its high-water mark. DDP then broadcasts the weights from the first rank in
    buckets, two in flight beside the weights (`whole_weights`: `whole_weights_bytes`)."""
    stored = whole_weights / cell.layout.mp_size if cell.layout.model_split == "tensor" else whole_weights
    whole = stored
    kind = _device_kind(cell)
    if kind == "cpu" and cell.peft != "qlora" and catalog.random_init(cell):
        whole = max(whole, 4.0 * counts.total)
    if cell.strategy == "ddp":
        whole = max(whole, stored + min(stored, 2 * DDP_BROADCAST_BUCKET))
    return RUNTIME_GB[kind] + whole / GB


def step_gb(cell: CellSpec, parts: dict[str, float], counts: params.ParamCounts) -> float | None:
    """Per rank at a DeepSpeed optimizer step: beside the weights, gradients and states, an fp32
    copy of the rank's flattened gradients, and (AdamW) the two temporaries PyTorch's AdamW
    makes of its states while it updates, each the size of the rank's whole flat fp32 partition
    (other engines step parameter by parameter, or fused). None where there is no such step, or
    it runs off the device (offloaded to the CPU from a GPU)."""
    layout = cell.layout
    if not layout.deepspeed or ("optim" in layout.offloaded and _device_kind(cell) != "cpu"):
        return None
    trained = counts.trainable / layout.dp_size / GB
    temporaries = 2 * 4 if cell.train.optimizer == "adamw" else 0
    state = sum(parts[k] for k in ("weights", "grads", "optim", "runtime"))
    return state + trained * (4 + temporaries)


def verdict(total: float, device: float | None) -> str:
    if device is None:
        return "?"
    return "fits" if total <= TIGHT * device else "tight" if total <= device else "will not fit"


def peak_tflops(cell: CellSpec) -> float | None:
    """The device's dense peak for the cell's precision; a nominal core for CPU types."""
    entry = catalog.instances().get(cell.instance)
    if entry is None:
        return None
    if entry.accelerator == "cpu":
        return CPU_CORE_TFLOPS * (entry.cores_per_device or 1)
    by_precision = {"fp32": entry.peak_tflops_fp32, "fp16-mixed": entry.peak_tflops_fp16}
    return by_precision.get(cell.precision, entry.peak_tflops_bf16)


def link_bytes_s(cell: CellSpec) -> float | None:
    """Collective bandwidth between the cell's ranks: the node's links, or the network between
    nodes; None when the ranks share nothing to talk over (one rank)."""
    if cell.world_size == 1:
        return None
    entry = catalog.instances().get(cell.instance)
    if entry is None or entry.accelerator == "cpu":
        return CPU_LINK_BYTES_S
    stated = re.search(r"(\d+(?:\.\d+)?)\s*GB/s", entry.interconnect or "")
    inside = float(stated.group(1)) * 1e9 if stated else 32e9 if "PCIe" in (entry.interconnect or "") else None
    between = entry.network_gbps * 1e9 / 8 if entry.network_gbps else None
    links = [b for b in (inside, between if cell.nodes > 1 else None) if b]
    return LINK_EFFICIENCY * min(links) if links else None


def comm_bytes(cell: CellSpec, shape: DecoderShape, counts: params.ParamCounts) -> float:
    """Bytes one rank sends per optimizer step (ring collectives: 2(n-1)/n of the data for an
    all-reduce, (n-1)/n for a gather or a scatter)."""
    layout, n = cell.layout, cell.layout.dp_size
    grad_width = 2 if cell.precision == "bf16-true" and cell.peft == "full" else 4
    width = 4 if cell.precision == "fp32" else 2
    ring = (n - 1) / n if n > 1 else 0.0
    total = 0.0
    if cell.strategy in ("ddp", "hybrid", "zero1", "zero2"):
        total += 2 * ring * counts.trainable * grad_width  # all-reduce, or reduce-scatter + all-gather
    if cell.strategy in ("fsdp", "zero3", "zero3_offload"):
        # every weight gathered for forward and again for backward, each micro-batch; gradients
        # reduce-scattered
        total += cell.grad_accum * ring * (2 * counts.total * width + counts.trainable * grad_width)
    if layout.model_split == "tensor":
        m = layout.mp_size
        per_layer = 4 * cell.micro_batch * cell.seq_len * shape.hidden * width * 2 * (m - 1) / m
        total += cell.grad_accum * shape.layers * per_layer
    if layout.model_split == "pipeline":
        total += 2 * cell.grad_accum * cell.micro_batch * cell.seq_len * shape.hidden * width
    return total


def step_seconds(cell: CellSpec, shape: DecoderShape, counts: params.ParamCounts,
                 efficiency: dict[str, float] | None = None,
                 overhead_s: float = 0.0) -> tuple[float | None, str | None]:
    """Predicted seconds per optimizer step, or None and why. `overhead_s`: what a step costs
    beside its FLOPs (launches, the optimizer, Python), 0 until calibrated."""
    peak = peak_tflops(cell)
    if not peak:
        return None, f"no peak TFLOP/s for {cell.precision} on {cell.instance} in the catalog"
    full = cell.peft == "full"
    head_dim = shape.hidden // shape.heads
    fpt = params.flops_per_token(shape.layers, shape.heads, head_dim, counts.trainable,
                                 counts.total - counts.trainable, counts.embedding, cell.seq_len, full)
    if cell.train.gradient_checkpointing:  # the forward again, in backward
        fpt += 2 * (counts.total - counts.embedding) + 4 * shape.layers * shape.heads * head_dim * cell.seq_len
    eff = (efficiency or DEFAULT_EFFICIENCY)[cell.strategy] * (QLORA_SPEED if cell.peft == "qlora" else 1.0)
    tokens = cell.global_batch * cell.seq_len
    compute = fpt * tokens / cell.world_size / (peak * 1e12 * eff)
    link = link_bytes_s(cell)
    comm = comm_bytes(cell, shape, counts) / link if link else 0.0
    if cell.layout.model_split == "pipeline":
        p, m = cell.layout.mp_size, cell.grad_accum
        compute *= (m + p - 1) / m  # the bubble
    if cell.layout.model_split:
        return overhead_s + compute + comm, None  # activations' collectives sit on the critical path
    return overhead_s + max(compute, comm), None  # gradient and weight traffic overlaps backward


def steps_of(cell: CellSpec) -> int | None:
    t = cell.train
    if t.epochs is None:
        return t.max_steps
    if cell.data.train_samples is None:
        return None
    return math.ceil(t.epochs * cell.data.train_samples / cell.global_batch)


def hourly_usd(cell: CellSpec, compute: str = "local") -> float | None:
    entry = catalog.instances().get(cell.instance)
    if entry is None:
        return None
    rate = entry.sagemaker_price_per_hour_usd if compute == "sagemaker" else entry.price_per_hour_usd
    if rate is None:
        return None
    return rate * (cell.world_size if entry.price_per == "device" else cell.nodes)


def predict(cell: CellSpec, facts: dict[str, Any] | None = None, compute: str = "local",
            efficiency: dict[str, float] | None = None, fixes: bool = True, overhead_s: float = 0.0) -> CellPlan:
    """The planner's answer for one cell."""
    arch = arch_of(cell, facts)
    if arch is None:
        return CellPlan(cell.cell_id, note=f"the shape of {cell.model} is not known without its facts")
    shape = DecoderShape.of(arch)
    counts = counts_of(cell, arch, facts)
    whole = whole_weights_bytes(cell, arch, counts)
    parts = memory_parts(cell, arch, counts, whole)
    device = device_memory_gb(cell)
    plan = CellPlan(cell.cell_id, parts, device, load_gb=load_gb(cell, counts, whole),
                    step_gb=step_gb(cell, parts, counts))
    plan = replace(plan, verdict=verdict(plan.peak_gb, device))
    step, why = step_seconds(cell, shape, counts, efficiency, overhead_s)
    if step is not None:
        n = steps_of(cell)
        kind = _device_kind(cell)
        wall = n * step + STARTUP_S[kind] if n is not None else None
        rate = hourly_usd(cell, compute)
        plan = replace(plan, step_s=step, tokens_per_s=cell.global_batch * cell.seq_len / step, steps=n,
                       wall_s=wall, cost_usd=wall / 3600 * rate if wall is not None and rate is not None else None)
    plan = replace(plan, note=why)
    if fixes and plan.verdict == "will not fit":
        plan = replace(plan, fix=cheapest_fix(cell, facts, compute, efficiency))
    return plan


def counts_of(cell: CellSpec, arch: dict[str, Any], facts: dict[str, Any] | None) -> params.ParamCounts:
    """From the model's shape; for models that are not presets, PEFT's own count from the facts."""
    lora = cell.train.lora
    counted = params.counts(arch, cell.peft, lora.r, lora.target_modules)
    entry = (facts or {}).get(cell.model) or {}
    if catalog.model_presets().get(cell.model) or "total_params" not in entry:
        return counted
    from steps.plan.compat import adapter_key

    adapter = entry.get("adapters", {}).get(adapter_key(cell), {})
    trainable = entry["total_params"] if cell.peft == "full" else adapter.get("trainable_params", counted.trainable)
    total = entry["total_params"] + (0 if cell.peft == "full" else trainable)
    return params.ParamCounts(total, trainable, counted.embedding)


def candidates(cell: CellSpec) -> list[tuple[str, CellSpec]]:
    """Changes that cut a cell's memory, each described as the user would set it."""
    def changed(**kw) -> CellSpec:
        return cell.model_copy(update=kw)

    out: list[tuple[str, CellSpec]] = []
    checkpointed = cell.train.model_copy(update={"gradient_checkpointing": True})
    mb, ga = cell.micro_batch, cell.grad_accum
    while mb > 1:
        mb, ga = max(1, mb // 2), ga * 2
        out.append((f"micro_batch {mb} x grad_accum {ga}", changed(micro_batch=mb, grad_accum=ga)))
    if not cell.train.gradient_checkpointing:
        out.append(("gradient_checkpointing", changed(train=checkpointed)))
        if cell.micro_batch > 1:
            out.append((f"gradient_checkpointing, micro_batch 1 x grad_accum {cell.micro_batch * cell.grad_accum}",
                        changed(train=checkpointed, micro_batch=1, grad_accum=cell.micro_batch * cell.grad_accum)))
    if cell.peft in ("lora", "dora"):
        out.append(("peft qlora", changed(peft="qlora")))
    entry = catalog.instances().get(cell.instance)
    if cell.world_size > 1 and cell.strategy in ("ddp", "zero1", "zero2", "fsdp"):
        out.append(("strategy zero3", changed(strategy="zero3")))
    if cell.world_size > 1 and cell.strategy != "zero3_offload" and cell.layout.model_split is None:
        out.append(("strategy zero3_offload", changed(strategy="zero3_offload")))
    per_node = entry.devices_per_node if entry is not None else 0
    gpus = cell.gpus * 2
    while per_node and gpus <= per_node:
        strategy = "fsdp" if cell.strategy in ("single", "ddp") else cell.strategy
        out.append((f"strategy {strategy} on {gpus} GPUs", changed(strategy=strategy, gpus=gpus)))
        gpus *= 2
    if not cell.train.gradient_checkpointing:  # sharding and checkpointing together
        out += [(f"{label}, gradient_checkpointing", c.model_copy(update={"train": checkpointed}))
                for label, c in list(out) if label.startswith("strategy")]
    return out


def cheapest_fix(cell: CellSpec, facts: dict[str, Any] | None, compute: str,
                 efficiency: dict[str, float] | None) -> str | None:
    """The change, among `candidates`, that fits at the least predicted cost (time where cost
    is unknown); None if none does."""
    from steps.plan import compat

    best: tuple[float, str] | None = None
    for label, changed in candidates(cell):
        if compat.refusal(changed):
            continue
        plan = predict(changed, facts, compute, efficiency, fixes=False)
        if plan.verdict not in ("fits", "tight"):
            continue
        score = plan.cost_usd if plan.cost_usd is not None else plan.wall_s if plan.wall_s is not None else 0.0
        if best is None or score < best[0]:
            best = (score, label)
    return best[1] if best else None


# ---------------------------------------------------------------------------------- the matrix
@dataclass(frozen=True)
class MatrixPlan:
    """Every cell's plan, and what the cells that will run add up to."""

    plans: dict[str, CellPlan]  # by cell id; refused cells have none
    cells: int
    runs: int  # cells not refused
    predicted_oom: list[str]
    wall_s: float | None  # summed over the cells that run (None if any is unknown)
    cost_usd: float | None
    unknown: list[str]  # cells without a time or cost prediction


def plan_matrix(planned: list, facts: dict[str, Any] | None = None, compute: str = "local",
                predict_cell: Callable[[CellSpec], CellPlan] | None = None) -> MatrixPlan:
    """`planned`: PlannedCells (`steps.plan.matrix.expand`, after `preflight.check`);
    `predict_cell`: the planner with a calibration (`steps.plan.calibrate`), else its defaults."""
    predict_cell = predict_cell or (lambda cell: predict(cell, facts, compute))
    plans = {p.cell.cell_id: predict_cell(p.cell) for p in planned if not p.refused}
    running = list(plans.values())
    oom = [p.cell_id for p in running if p.verdict == "will not fit"]
    fitting = [p for p in running if p.verdict != "will not fit"]
    unknown = [p.cell_id for p in fitting if p.wall_s is None or p.cost_usd is None]
    walls = [p.wall_s for p in fitting if p.wall_s is not None]
    costs = [p.cost_usd for p in fitting if p.cost_usd is not None]
    return MatrixPlan(plans, len(planned), len(running), oom, sum(walls) if walls else None,
                      sum(costs) if costs else None, unknown)


def apply_settings(spec, planned: list, matrix_plan: MatrixPlan) -> list:
    """The matrix's `plan:` settings: predicted out-of-memory cells become `skipped` rows
    (`skip_predicted_oom`); a predicted total over `max_cost_usd` or `max_hours` is refused
    with a `ConfigError` before anything runs."""
    from steps.plan.schema import ConfigError

    settings = spec.plan
    out = []
    for p in planned:
        plan = matrix_plan.plans.get(p.cell.cell_id)
        if settings.skip_predicted_oom and plan is not None and plan.verdict == "will not fit":
            p = replace(p, refused=plan.reason())
        out.append(p)
    skipped = {p.cell.cell_id for p in out if p.refused}
    kept = [plan for cid, plan in matrix_plan.plans.items() if cid not in skipped]
    problems = []
    cost = sum(p.cost_usd or 0.0 for p in kept)
    hours = sum(p.wall_s or 0.0 for p in kept) / 3600
    if settings.max_cost_usd is not None and cost > settings.max_cost_usd:
        problems.append(f"plan.max_cost_usd: the cells that would run are predicted to cost ${cost:,.2f}, over "
                        f"the budget of ${settings.max_cost_usd:,.2f} (`python -m steps.plan` shows each cell)")
    if settings.max_hours is not None and hours > settings.max_hours:
        problems.append(f"plan.max_hours: the cells that would run are predicted to take {hours:,.2f} h, over "
                        f"the budget of {settings.max_hours:,.2f} h (`python -m steps.plan` shows each cell)")
    if problems:
        raise ConfigError(problems, spec.name)
    return out


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def show(planned: list, matrix_plan: MatrixPlan, out=None) -> None:
    """The plan as a table: one row per cell, memory per rank by part, the verdict and fix,
    time and cost; the totals under it."""
    import sys

    from rich.console import Console
    from rich.table import Table

    title = (f"{matrix_plan.cells} cells: {matrix_plan.runs} run, {matrix_plan.cells - matrix_plan.runs} refused; "
             f"{len(matrix_plan.predicted_oom)} predicted out of memory")
    table = Table(title=title, show_lines=False)
    right = ("GB/rank", "load GB", "step", "tokens/s", "wall", "cost $")
    for col in ("cell", "model", "peft", "strategy", "n x gpus", "instance", "mb x ga", "precision", "seq",
                "weights", "grads", "optim", "acts", "buffers", "runtime", "GB/rank", "load GB", "step GB", "device GB",
                "verdict", "cheapest fix", "step", "tokens/s", "wall", "cost $"):
        table.add_column(col, justify="right" if col in right else "left",
                         no_wrap=col in ("cell", "cheapest fix", "verdict"))
    for p in planned:
        c = p.cell
        head = [c.cell_id, c.model, c.peft, c.strategy, f"{c.nodes} x {c.gpus}", c.instance,
                f"{c.micro_batch} x {c.grad_accum}", c.precision, str(c.seq_len)]
        plan = matrix_plan.plans.get(c.cell_id)
        if plan is None or not plan.memory_gb:
            why = f"refused: {p.refused}" if p.refused else (plan.note if plan else "")
            table.add_row(*head, *[""] * 10, why, *[""] * 5)
            continue
        m = plan.memory_gb
        style = {"fits": "green", "tight": "yellow", "will not fit": "red"}.get(plan.verdict, "")
        memory_cells = [_gb(m[k]) for k in ("weights", "grads", "optim", "activations", "buffers", "runtime")]
        table.add_row(*head, *memory_cells, _gb(plan.total_gb), _gb(plan.load_gb), _gb(plan.step_gb),
                      _gb(plan.device_gb),
                      f"[{style}]{plan.verdict}[/]" if style else plan.verdict,
                      plan.fix or ("none found" if plan.verdict == "will not fit" else ""),
                      "?" if plan.step_s is None else f"{plan.step_s:.3g} s",
                      "?" if plan.tokens_per_s is None else f"{plan.tokens_per_s:,.0f}", _duration(plan.wall_s),
                      "?" if plan.cost_usd is None else f"{plan.cost_usd:,.2f}")
    console = Console(file=out or sys.stdout, width=260)
    console.print(table)
    fitting = matrix_plan.runs - len(matrix_plan.predicted_oom)
    cost = "?" if matrix_plan.cost_usd is None else f"${matrix_plan.cost_usd:,.2f}"
    console.print(f"Cells predicted to fit: {fitting}, one after another {_duration(matrix_plan.wall_s)}, {cost}"
                  + (f" ({len(matrix_plan.unknown)} without a prediction)" if matrix_plan.unknown else ""))
