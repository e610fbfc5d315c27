"""The VRAM budget of a cell, worked out before it runs (reference study 3): weights,
gradients, optimizer states and activations per rank, by method, precision, strategy, batch
and context length; the report sets it beside the measured peak.

Conventions (stated in the report):
- weights: 4 bytes per parameter (fp32 master weights; bf16/fp16-mixed compute in autocast),
  2 with bf16-true; a QLoRA base 0.5 (4-bit NF4), its adapters as the others.
- gradients: trainable parameters x 4 bytes (2 with bf16-true); AdamW keeps two states per
  trainable parameter at the same width (paged 8-bit AdamW: 1 byte each; SGD: none).
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

from typing import Any

import numpy as np
import pandas as pd

from steps.plan import catalog
from steps.plan.layout import ParallelLayout
from steps.plan.schema import ParallelSettings, TrainSettings

GB = 1e9
# Bytes of optimizer state per trainable parameter and byte of weight width (AdamW: two states).
STATE_BYTES = {"adamw": lambda width: 2 * width, "paged_adamw_8bit": lambda width: 2, "sgd": lambda width: 0}


def _arch(model: str) -> dict[str, Any] | None:
    preset = catalog.model_presets().get(model)
    return preset.config if preset and preset.config else None


def _setting(r: Any, name: str, default: Any) -> Any:
    """A train.* setting of the row; the schema's default where the table has none (older runs)."""
    value = r.get(name) if hasattr(r, "get") else None
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else value


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
    width = 2 if true16 else 4
    base = 0.5 if r["peft"] == "qlora" else width
    state = STATE_BYTES[str(_setting(r, "train.optimizer", defaults.optimizer))](width)
    parts = {"weights": frozen * base + trainable * width, "grads": trainable * width, "optim": trainable * state}

    s, b = float(r["seq_len"]), float(r["micro_batch"])
    h, layers = float(arch["hidden_size"]), float(arch["num_hidden_layers"])
    heads, vocab = float(arch["num_attention_heads"]), float(arch["vocab_size"])
    checkpointed = bool(_setting(r, "train.gradient_checkpointing", defaults.gradient_checkpointing))
    per_layer = 2 * s * b * h if checkpointed else s * b * h * (34 + 5 * heads * s / h)
    if r["precision"] == "fp32":
        per_layer *= 2
    parts["activations"] = per_layer * layers + s * b * vocab * 4 * 2

    layout = layout_of(r)
    return {part: layout.per_rank(part, size) for part, size in parts.items()}


def budget(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell that ran and whose model is a preset (its architecture is known)."""
    rows = []
    for _, r in df[df["outcome"].isin(["ok", "oom"])].iterrows():
        arch = _arch(r["model"])
        if arch is None or pd.isna(r.get("total_params")) or pd.isna(r.get("trainable_params")):
            continue
        parts = {k: v / GB for k, v in estimate(r, arch).items()}
        rows.append({"cell_id": r["cell_id"], "model": r["model"], "peft": r["peft"], "strategy": r["strategy"],
                     "instance": r["instance"], "world_size": r["world_size"], "precision": r["precision"],
                     "micro_batch": r["micro_batch"], "seq_len": r["seq_len"], "outcome": r["outcome"],
                     "weights_gb": parts["weights"], "grads_gb": parts["grads"], "optim_gb": parts["optim"],
                     "activations_gb": parts["activations"], "estimate_gb": sum(parts.values()),
                     "peak_mem_gb": r["peak_mem_gb"],
                     "device_gb": _device_gb(r["instance"])})
    out = pd.DataFrame(rows)
    if len(out):
        known = out["device_gb"].notna()
        out["fits"] = [bool(e <= g) if k else None for e, g, k in zip(out["estimate_gb"], out["device_gb"], known)]
    return out


def _device_gb(instance: str) -> float:
    """The GPU's memory from the catalog; NaN for CPU types (no fixed device memory)."""
    entry = catalog.instances().get(instance)
    return float(entry.memory_per_device_gb) if entry and entry.memory_per_device_gb else np.nan
