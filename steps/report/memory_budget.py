"""The VRAM budget table of the report: the plan's memory model (`steps.estimate.memory`) per cell
that ran, beside its measured peak and its device's memory."""

from __future__ import annotations

import numpy as np
import pandas as pd

from steps.estimate.memory import GB, estimate
from steps.plan import catalog

__all__ = ["budget", "estimate"]


def _arch(model: str) -> dict | None:
    preset = catalog.model_presets().get(model)
    return preset.config if preset and preset.config else None


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
