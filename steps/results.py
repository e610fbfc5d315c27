"""The results table: one row per cell, settings + outcome + metrics (DESIGN.md section 4)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from steps.schema import CellSpec

# Fixed by the design: users' scripts and checks read these names.
COLUMNS = [
    "run_id", "cell_id", "outcome", "error", "model", "peft", "strategy", "instance", "nodes",
    "gpus", "world_size", "lr", "micro_batch", "grad_accum", "global_batch", "precision",
    "seq_len", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "val_loss",
    "accuracy", "wall_s", "train_s", "cost_usd",
]
EXTRA_METRICS = [
    "token_accuracy", "final_train_loss", "trainable_params", "total_params", "achieved_tflops",
    "flops_per_token", "steps_per_epoch", "eval_s", "trainer_wall_s", "overhead_s", "queued_s",
    "exit_code", "device", "stopped_after_steps", "step_s", "epoch_s", "epochs",
    "target_loss", "time_to_target_s", "tokens_to_target", "steps_to_target",
]
# The curves travel in the table (JSON text), so the report needs nothing but the table.
CURVE_FIELDS = {"loss_curve": ("step", "loss", "tokens", "time_s"),
                "val_curve": ("step", "time_s", "val_loss", "accuracy")}
SETTINGS = ["model", "peft", "strategy", "instance", "nodes", "gpus", "lr", "micro_batch",
            "grad_accum", "precision", "seq_len"]


def row(run_id: str, cell: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    out = {"run_id": run_id, "cell_id": cell["cell_id"], "matrix": cell.get("matrix", "")}
    spec = CellSpec.model_validate(cell)
    out.update({k: cell[k] for k in SETTINGS})
    out.update(world_size=spec.world_size, dp_size=spec.dp_size, global_batch=spec.global_batch)
    for k in COLUMNS + EXTRA_METRICS:
        out.setdefault(k, m.get(k))
    out["warmup_tokens_per_s"] = (m.get("warmup") or {}).get("tokens_per_s")
    curve = m.get("loss_curve") or []
    out["train_steps"] = len(curve)
    out["train_tokens"] = float(sum(p.get("tokens", 0) for p in curve))
    for name, keys in CURVE_FIELDS.items():
        points = [{k: p.get(k) for k in keys} for p in m.get(name) or []]
        out[name] = json.dumps(points, separators=(",", ":"))
    per_rank = m.get("peak_mem_gb_per_rank")
    out["peak_mem_gb_per_rank"] = json.dumps(per_rank) if per_rank is not None else None
    return out


def build_table(run_id: str, records: list[tuple[dict[str, Any], dict[str, Any]]]) -> pd.DataFrame:
    """records: (cell settings, metrics) per cell, in matrix order."""
    df = pd.DataFrame([row(run_id, cell, m) for cell, m in records])
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[COLUMNS + extra]
    numeric = ["tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "val_loss",
               "accuracy", "wall_s", "train_s", "cost_usd", "token_accuracy", "final_train_loss",
               "step_s", "epoch_s", "epochs", "target_loss", "time_to_target_s", "tokens_to_target",
               "train_tokens"]
    df[numeric] = df[numeric].astype("float64")
    return df


def write(df: pd.DataFrame, run_dir: Path) -> dict[str, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": run_dir / "results.parquet", "csv": run_dir / "results.csv"}
    df.to_parquet(paths["parquet"], index=False)
    df.to_csv(paths["csv"], index=False)
    return paths
