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
- activations (Korthikanti et al. 2022, no recomputation): per layer s*b*h*(34 + 5*a*s/h)
  bytes at 16 bits, twice that in fp32; with gradient checkpointing 2*s*b*h per layer; plus
  the logits and their gradient, s*b*V*4*2.
- sharding, from the cell's layout (`steps/plan/layout.py`): FSDP and ZeRO-3 divide weights,
  gradients and states by the data-parallel size; ZeRO-2 gradients and states; ZeRO-1 states;
  ZeRO-3 offload keeps weights and states on the CPU; tensor, pipeline and hybrid divide
  everything by the model-parallel size (hybrid: `train.parallel.model_parallel`).
- the optimizer (`train.optimizer`) and gradient checkpointing (`train.gradient_checkpointing`)
  are the cell's.
"""

from __future__ import annotations

import math
from typing import Any

from steps.plan import catalog
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
    # Trainable parameters: bf16 only when full fine-tuning in bf16-true; PEFT keeps adapters in
    # fp32 otherwise. A frozen base is stored in 16 bits under any 16-bit precision.
    width = 2 if true16 and full else 4
    base = 2 if true16 or r["precision"] in ("bf16-mixed", "fp16-mixed") else 4
    if r["peft"] == "qlora":
        # 4-bit linear layers; the embeddings (and an untied head) stay unquantized, in fp32 as
        # PEFT's prepare_model_for_kbit_training leaves them.
        dense = float(arch["vocab_size"]) * float(arch["hidden_size"]) * (
            1 if arch.get("tie_word_embeddings", False) else 2)
        weights = (frozen - dense) * 0.5 + dense * 4
    else:
        weights = frozen * base
    state = STATE_BYTES[str(_setting(r, "train.optimizer", defaults.optimizer))](width)
    parts = {"weights": weights + trainable * width, "grads": trainable * width, "optim": trainable * state}

    s, b = float(r["seq_len"]), float(r["micro_batch"])
    h, layers = float(arch["hidden_size"]), float(arch["num_hidden_layers"])
    heads, vocab = float(arch["num_attention_heads"]), float(arch["vocab_size"])
    checkpointed = bool(_setting(r, "train.gradient_checkpointing", defaults.gradient_checkpointing))
    # Fused attention (SDPA's flash / memory-efficient kernels on a GPU, FlashAttention-2) keeps
    # no s x s score matrix: Korthikanti's 5as/h term is gone.
    entry = catalog.instances().get(str(r.get("instance", "")))
    fused_attention = (entry is not None and not entry.local
                       and _setting(r, "attn_implementation", "") in ("sdpa", "flash_attention_2"))
    scores = 0 if fused_attention else 5 * heads * s / h
    per_layer = 2 * s * b * h if checkpointed else s * b * h * (34 + scores)
    if r["precision"] == "fp32":
        per_layer *= 2
    parts["activations"] = per_layer * layers + s * b * vocab * 4 * 2

    layout = layout_of(r)
    return {part: layout.per_rank(part, size) for part, size in parts.items()}
