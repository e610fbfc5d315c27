"""The results table: one row per cell, its settings, its outcome and what it measured.

Columns, in order: the fixed names of the design's contract (`COLUMNS`), then every other
metric of `metrics.json` (`steps/results/metrics.py`), the curves as JSON text (so the report
needs nothing but the table), and every `train.*` / `data.*` setting of the cell by its dotted
name (`train.lora.r`, `data.packing`), so that cells differing in any setting stay apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from steps.plan import lora_kernels, settings
from steps.plan.schema import CellSpec
from steps.results.metrics import CellMetrics

# Fixed by the design: users' scripts and checks read these names.
COLUMNS = [
    "run_id", "cell_id", "outcome", "error", "model", "peft", "strategy", "instance", "nodes",
    "gpus", "world_size", "lr", "micro_batch", "grad_accum", "global_batch", "precision",
    "seq_len", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "val_loss",
    "accuracy", "wall_s", "train_s", "cost_usd",
]
# The cell's axes (its settings beside train.* and data.*).
AXES = ["model", "peft", "strategy", "instance", "nodes", "gpus", "lr", "micro_batch",
        "grad_accum", "precision", "seq_len"]
# Metrics that are lists or mappings: the curves and per-rank lists travel as JSON text, the
# warm-up as its tokens/s; library versions are in the run's provenance.
CURVES = ("loss_curve", "val_curve", "speed_curve")
AS_JSON = ("peak_mem_gb_per_rank", "peak_reserved_gb_per_rank", "gpu_util_pct_per_rank", "gpu_mem_used_gb_per_rank",
           "cores")
NOT_IN_TABLE = ("versions", "warmup")
METRICS = [f for f in CellMetrics.model_fields if f not in (*CURVES, *AS_JSON, *NOT_IN_TABLE)]
# Measured quantities as float64 (NaN where a cell has none), whatever the first rows hold.
NUMERIC = [f for f, info in CellMetrics.model_fields.items() if f in METRICS and info.annotation == float | None]
NUMERIC += ["train_tokens", "warmup_tokens_per_s"]
SETTINGS = settings.leaf_paths()


def row(run_id: str, cell: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One cell's row: its settings (every one), shape, metrics, curves."""
    spec = CellSpec.model_validate(cell)
    m = CellMetrics.from_dict(metrics, f"metrics of {spec.cell_id}")
    out: dict[str, Any] = {"run_id": run_id, "cell_id": spec.cell_id, "matrix": spec.matrix}
    out.update({axis: getattr(spec, axis) for axis in AXES}, repeat=spec.repeat)
    out.update(world_size=spec.world_size, dp_size=spec.dp_size, global_batch=spec.global_batch)
    for name in METRICS:
        out.setdefault(name, getattr(m, name))
    out["warmup_tokens_per_s"] = m.warmup.tokens_per_s if m.warmup else None
    # asked for, and PEFT's modules ran: why (the model's layers, as the trainer found them, or the settings)
    out["lora_kernels_off"] = m.lora_kernels_off or lora_kernels.off_reason(spec)
    own = m.speed_curve or m.loss_curve  # a speed cell's loss_curve is its class's
    out["train_steps"] = len(own)
    out["train_tokens"] = float(sum(p.tokens for p in own))
    for name in CURVES:
        out[name] = json.dumps([p.model_dump() for p in getattr(m, name)], separators=(",", ":"))
    for name in AS_JSON:
        value = getattr(m, name)
        out[name] = json.dumps(value) if value is not None else None
    out.update(settings.flatten(spec))
    return out


def build_table(run_id: str, records: list[tuple[dict[str, Any], dict[str, Any]]]) -> pd.DataFrame:
    """records: (cell settings, metrics) per cell, in matrix order."""
    df = pd.DataFrame([row(run_id, cell, m) for cell, m in records])
    df = df[COLUMNS + [c for c in df.columns if c not in COLUMNS]]
    df[NUMERIC] = df[NUMERIC].astype("float64")
    return df


def write(df: pd.DataFrame, run_dir: Path) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": run_dir / "results.parquet", "csv": run_dir / "results.csv"}
    df.to_parquet(paths["parquet"], index=False)
    df.to_csv(paths["csv"], index=False)
    return paths
