"""How much memory: what one rank of a cell holds, worked out before it runs; no torch.

Two layers. `estimate` is the training state by part (weights, gradients, optimizer states,
activations; reference study 3's budget) for one row of a results table, so the report and the
GPU bench put it beside a measured peak. `memory_parts`, `load_gb` and `step_gb` are what the
planner adds for a cell: the framework's buffers beside that state (DeepSpeed's buckets, FSDP's
and ZeRO-3's gathered layers), the runtime, the model while it loads, and DeepSpeed's optimizer
step; `device_memory_gb` and `verdict` say whether it fits.

Conventions (stated in the report):
- weights, as the trainer lays them out (`steps.trainer.modeling.weights_dtype`): full
  fine-tuning 4 bytes per parameter (fp32 master weights; bf16/fp16-mixed compute in
  autocast), 2 with bf16-true; a frozen LoRA/DoRA base 2 bytes under any 16-bit precision
  (bf16/fp16-mixed and bf16-true), 4 in fp32; a QLoRA base 0.5 (4-bit NF4) for its linear
  layers and 4 for its embeddings (and untied head), which stay unquantized; adapters 4.
- gradients: trainable parameters x their width; AdamW keeps two states per trainable
  parameter at the same width (paged 8-bit AdamW: 1 byte each; SGD: none).
- DeepSpeed (ZeRO-1/2/3) casts the whole module, adapters included, to 16 bits under any 16-bit
  precision (no autocast), and its optimizer keeps an fp32 copy of the trained weights (a clone
  even in fp32) beside fp32 states.
- activations, as autograd keeps them (`steps/estimate/activations.py`, each term checked against
  the real model's saved tensors): per layer and token by method, precision, attention kernel
  (a mask, as packing and padding give, repeats grouped k/v), LoRA targets, fused kernels
  (`train.liger`), compiled layers and gradient checkpointing; the loss at its peak (12 bytes
  per vocabulary entry per token); autocast's 16-bit weight copies under full fine-tuning.
- sharding, from the cell's layout (`steps/plan/layout.py`): FSDP and ZeRO-3 divide weights,
  gradients and states by the data-parallel size; ZeRO-2 gradients and states; ZeRO-1 states;
  ZeRO-3 offload keeps weights and states on the CPU (a CPU rank's own memory all the same);
  tensor, pipeline and hybrid divide everything by the model-parallel size (hybrid:
  `train.parallel.model_parallel`).
- the optimizer (`train.optimizer`) and gradient checkpointing (`train.gradient_checkpointing`)
  are the cell's.
"""

from __future__ import annotations

import math
import os
from typing import Any

from steps.estimate import activations
from steps.estimate.activations import DecoderShape
from steps.estimate.params import ParamCounts
from steps.plan import catalog, lora_kernels
from steps.plan.layout import ParallelLayout
from steps.plan.schema import CellSpec, ParallelSettings, TrainSettings
from steps.plan.settings import flatten

GB = 1e9
# CUDA context + cuBLAS workspace; a CPU process's libraries (the trainer measures its own:
# metrics' runtime_baseline_gb)
RUNTIME_GB = {"gpu": 0.6, "cpu": 0.5}
TIGHT = 0.9  # above this share of the device's memory a cell is "tight"
DDP_BROADCAST_BUCKET = 250 * 2**20  # bytes: torch's DDP syncs the weights at start in buckets this size
ZERO3_REUSE_DISTANCE = 1e9  # DeepSpeed's stage3_max_reuse_distance, which the trainer keeps
# Bytes of optimizer state per trainable parameter and byte of weight width (AdamW: two states).
STATE_BYTES = {"adamw": lambda width: 2 * width, "paged_adamw_8bit": lambda width: 2, "sgd": lambda width: 0}


def _setting(r: Any, name: str, default: Any) -> Any:
    """A train.* setting of the row; the schema's default where the table has none (older runs)."""
    value = r.get(name) if hasattr(r, "get") else None
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def layout_of(r: Any) -> ParallelLayout:
    defaults = ParallelSettings()
    return ParallelLayout.of(str(r["strategy"]), int(r["world_size"]),
                             _setting(r, "train.parallel.hybrid_inner", defaults.hybrid_inner),
                             int(_setting(r, "train.parallel.model_parallel", defaults.model_parallel)))


def estimate(r: Any, arch: dict[str, Any]) -> dict[str, float]:
    """Bytes per rank of each part, for one row of the results table."""
    defaults = TrainSettings()
    total, trainable = float(r["total_params"]), float(r["trainable_params"])
    frozen = total - trainable
    true16 = r["precision"] == "bf16-true"
    full = r["peft"] == "full"
    layout = layout_of(r)
    # Trainable parameters: bf16 only when full fine-tuning in bf16-true; PEFT keeps adapters in
    # fp32 otherwise. A frozen base is stored in 16 bits under any 16-bit precision.
    width = 2 if true16 and full else 4
    base = 2 if true16 or r["precision"] in ("bf16-mixed", "fp16-mixed") else 4
    optimizer = STATE_BYTES[str(_setting(r, "train.optimizer", defaults.optimizer))]
    state = optimizer(width)
    if layout.deepspeed:
        # DeepSpeed casts the whole module (adapters too) to its 16-bit dtype under any 16-bit
        # precision, and its optimizer keeps an fp32 copy of the trained weights (a clone even
        # in fp32) and fp32 states.
        width = base = 4 if r["precision"] == "fp32" else 2
        state = 4 + optimizer(4)
    if r["peft"] == "qlora":
        # 4-bit linear layers; the embeddings (and an untied head) stay unquantized, in the
        # base's width (steps.trainer.modeling.apply_peft).
        dense = float(arch["vocab_size"]) * float(arch["hidden_size"]) * (
            1 if arch.get("tie_word_embeddings", False) else 2)
        weights = (frozen - dense) * 0.5 + dense * base
    else:
        weights = frozen * base
    parts = {"weights": weights + trainable * width, "grads": trainable * width, "optim": trainable * state}

    parts["activations"] = activations.activation_bytes(
        activations.DecoderShape.of(arch), kernels_of(r, arch), int(r["seq_len"]), int(r["micro_batch"]))

    # Offloading to the CPU moves nothing off a CPU rank: its own process holds the parts.
    entry = catalog.instances().get(str(r.get("instance", "")))
    on_host = entry is not None and entry.local
    return {part: layout.per_rank(part, size, on_host) for part, size in parts.items()}


def kernels_of(r: Any, arch: dict[str, Any]) -> activations.Kernels:
    """What of a row decides its activations: the metrics where the cell ran (the attention
    implementation transformers chose, the adapted modules), the settings otherwise."""
    defaults = TrainSettings()
    attention = r.get("attn_implementation") if hasattr(r, "get") else None
    if not isinstance(attention, str) or not attention:
        attention = str(_setting(r, "train.attn_implementation", "sdpa"))
    attention = "sdpa" if attention == "auto" else attention
    targets = r.get("lora_targets") if hasattr(r, "get") else None
    if not isinstance(targets, (list, tuple, str)) or not len(targets):
        targets = _setting(r, "train.lora.target_modules", None)
    shape = activations.DecoderShape.of(arch)
    deepspeed16 = layout_of(r).deepspeed and r["precision"] != "fp32"
    compiled = str(_setting(r, "train.compile", defaults.compile))
    kernels_run = (lora_kernels.setting(_setting(r, "train.lora_kernels", None)) != "false"  # as the cell runs
                   and lora_kernels.why_not(str(r["peft"]), layout_of(r), compiled) is None
                   and not _setting(r, "lora_kernels_off", None))
    return activations.Kernels(
        method=str(r["peft"]), precision="bf16-true" if deepspeed16 else str(r["precision"]), attention=attention,
        masked=attention in ("sdpa", "eager"),
        liger=bool(_setting(r, "train.liger", defaults.liger)),
        compiled=compiled != "off",
        checkpointed=bool(_setting(r, "train.gradient_checkpointing", defaults.gradient_checkpointing)),
        targets=activations.adapted(targets, list(shape.linears()), shape.model_type) if r["peft"] != "full"
        else frozenset(),
        lora_r=int(_setting(r, "train.lora.r", defaults.lora.r)),
        lora_dropout=float(_setting(r, "train.lora.dropout", defaults.lora.dropout)),
        loss_chunk=int(_setting(r, "train.loss_chunk", defaults.loss_chunk))
        if _setting(r, "train.loss", defaults.loss) == "chunked" else 0,
        adapters16=deepspeed16,
        # runs measured while PEFT still cast each adapted layer's input up (activations.Kernels)
        input_cast=bool(_setting(r, "adapter_input_cast", False)),
        lora_kernels=kernels_run)


# ------------------------------------------------------------------------ a cell, as planned
def row_of(cell: CellSpec, counts: ParamCounts, kernels_off: str | None = None) -> dict[str, Any]:
    """The cell as a results-table row (settings by their dotted names, parameter counts), the
    form `estimate` reads (`kernels_off`: why the model's own layers keep the LoRA kernels off,
    from its facts: `steps.plan.lora_kernels.off_reason`)."""
    top = cell.model_dump(mode="json", exclude={"train", "data"})
    return {**top, **flatten(cell), "world_size": cell.world_size, "total_params": counts.total,
            "trainable_params": counts.trainable, "lora_kernels_off": kernels_off or lora_kernels.off_reason(cell)}


def device_memory_gb(cell: CellSpec) -> float | None:
    """What one rank may hold: the cell's `memory_cap_gb`, else its GPU's memory, else (CPU) this
    machine's memory shared by the cell's processes."""
    entry = catalog.instances().get(cell.instance)
    limits = [cell.train.memory_cap_gb] if cell.train.memory_cap_gb else []
    if entry is not None and entry.memory_per_device_gb:
        limits.append(entry.memory_per_device_gb)
    elif entry is not None and entry.local and not limits:
        try:
            limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB / cell.world_size)
        except (ValueError, OSError):
            pass
    return min(limits) if limits else None


def buffers_bytes(cell: CellSpec, shape: DecoderShape, counts: ParamCounts, whole_weights: float) -> float:
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
        root_width = 4 if cell.precision == "fp32" or (cell.peft == "full" and cell.precision != "bf16-true") else 2
        return 2 * layer * width + 4 * trainable_layer + root * root_width * (1 - 1 / layout.dp_size)
    return 0.0


def memory_parts(cell: CellSpec, arch: dict[str, Any], counts: ParamCounts,
                 whole_weights: float, kernels_off: str | None = None) -> dict[str, float]:
    """GB per rank: weights, gradients, optimizer states, activations, framework buffers,
    runtime (`whole_weights`: `whole_weights_bytes` of the cell; `kernels_off`: `row_of`'s)."""
    parts = estimate(row_of(cell, counts, kernels_off), arch)
    shape = DecoderShape.of(arch)
    if cell.layout.model_split == "pipeline":
        # In flight on the first stage: every micro-batch under GPipe, one per stage under 1F1B.
        m, p = cell.grad_accum, cell.layout.mp_size
        gpipe = cell.train.parallel.pipeline_schedule == "gpipe" or m < p
        parts["activations"] *= m if gpipe else min(p, m)
    out = {k: v / GB for k, v in parts.items()}
    out["buffers"] = buffers_bytes(cell, shape, counts, whole_weights) / GB
    out["runtime"] = RUNTIME_GB[catalog.device_kind(cell.instance)]
    return out


def whole_weights_bytes(cell: CellSpec, arch: dict[str, Any], counts: ParamCounts) -> float:
    """Bytes of the model's weights unsharded, as the cell stores them."""
    return estimate({**row_of(cell, counts), "strategy": "single", "world_size": 1}, arch)["weights"]


def load_gb(cell: CellSpec, counts: ParamCounts, whole_weights: float) -> float:
    """Per rank while the model loads: every strategy but tensor parallelism (which loads its
    shard) first puts the whole model on each rank's device, in its stored dtype, then shards or
    splits it; random weights are drawn in fp32 on the CPU first, which a CPU rank's resident
    set keeps as its high-water mark. DDP then broadcasts the weights from the first rank in
    buckets, two in flight beside the weights (`whole_weights`: `whole_weights_bytes`)."""
    stored = whole_weights / cell.layout.mp_size if cell.layout.model_split == "tensor" else whole_weights
    whole = stored
    kind = catalog.device_kind(cell.instance)
    if kind == "cpu" and cell.peft != "qlora" and catalog.random_init(cell):
        whole = max(whole, 4.0 * counts.total)
    if cell.strategy == "ddp":
        whole = max(whole, stored + min(stored, 2 * DDP_BROADCAST_BUCKET))
    return RUNTIME_GB[kind] + whole / GB


def step_gb(cell: CellSpec, parts: dict[str, float], counts: ParamCounts) -> float | None:
    """Per rank at a DeepSpeed optimizer step: beside the weights, gradients and states, an fp32
    copy of the rank's flattened gradients, and (AdamW) the two temporaries PyTorch's AdamW
    makes of its states while it updates, each the size of the rank's whole flat fp32 partition
    (other engines step parameter by parameter, or fused). None where there is no such step, or
    it runs off the device (offloaded to the CPU from a GPU)."""
    layout = cell.layout
    if not layout.deepspeed or ("optim" in layout.offloaded and catalog.device_kind(cell.instance) != "cpu"):
        return None
    trained = counts.trainable / layout.dp_size / GB
    temporaries = 2 * 4 if cell.train.optimizer == "adamw" else 0
    state = sum(parts[k] for k in ("weights", "grads", "optim", "runtime"))
    return state + trained * (4 + temporaries)


def verdict(total: float, device: float | None) -> str:
    """fits, tight (over `TIGHT` of the device), will not fit; ? where the device is unknown."""
    if device is None:
        return "?"
    return "fits" if total <= TIGHT * device else "tight" if total <= device else "will not fit"
