"""The memory of a cell per rank, worked out before it runs (reference study 3): weights,
gradients, optimizer states and activations, by method, precision, strategy, batch and
context length. One model for the report (beside the measured peak) and the GPU bench; no torch.

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
- activations, as autograd keeps them (`steps/plan/activations.py`, each term checked against
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
from typing import Any

from steps.plan import activations, catalog
from steps.plan.layout import ParallelLayout
from steps.plan.schema import ParallelSettings, TrainSettings

GB = 1e9
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
        # 4-bit linear layers; the embeddings (and an untied head) stay unquantized, in fp32 as
        # PEFT's prepare_model_for_kbit_training leaves them.
        dense = float(arch["vocab_size"]) * float(arch["hidden_size"]) * (
            1 if arch.get("tie_word_embeddings", False) else 2)
        weights = (frozen - dense) * 0.5 + dense * 4
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
    entry = catalog.instances().get(str(r.get("instance", "")))
    deepspeed16 = layout_of(r).deepspeed and r["precision"] != "fp32"
    return activations.Kernels(
        method=str(r["peft"]), precision="bf16-true" if deepspeed16 else str(r["precision"]), attention=attention,
        masked=attention in ("sdpa", "eager"),
        liger=bool(_setting(r, "train.liger", defaults.liger)),
        compiled=str(_setting(r, "train.compile", defaults.compile)) != "off",
        checkpointed=bool(_setting(r, "train.gradient_checkpointing", defaults.gradient_checkpointing)),
        targets=activations.adapted(targets, list(shape.linears()), shape.model_type) if r["peft"] != "full"
        else frozenset(),
        lora_r=int(_setting(r, "train.lora.r", defaults.lora.r)),
        lora_dropout=float(_setting(r, "train.lora.dropout", defaults.lora.dropout)),
        cuda=entry is not None and entry.accelerator != "cpu",
        loss_chunk=int(_setting(r, "train.loss_chunk", defaults.loss_chunk))
        if _setting(r, "train.loss", defaults.loss) == "chunked" else 0,
        adapters16=deepspeed16)
