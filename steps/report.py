"""The comparison report, from a results table alone (so it can be rebuilt without Metaflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

TABLE_COLUMNS = {
    "cell_id": "cell", "outcome": "outcome", "peft": "peft", "strategy": "strategy",
    "world_size": "ranks", "lr": "lr", "global_batch": "global batch",
    "tokens_per_s": "tokens/s", "tokens_per_s_per_device": "tokens/s/dev",
    "peak_mem_gb": "peak mem GB", "val_loss": "val loss", "accuracy": "accuracy",
    "train_s": "train s", "wall_s": "wall s", "cost_usd": "cost $",
}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def markdown_table(df: pd.DataFrame, columns: dict[str, str]) -> str:
    cols = [c for c in columns if c in df.columns]
    lines = ["| " + " | ".join(columns[c] for c in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def build_markdown(df: pd.DataFrame, meta: dict[str, Any]) -> str:
    counts = df["outcome"].value_counts().to_dict()
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    failed = df[df["outcome"] != "ok"]
    parts = [
        f"# finetune-matrix report: {meta.get('matrix', '')}",
        "",
        f"Run `{meta.get('run_id', '')}` of `{meta.get('flow', 'FinetuneMatrixFlow')}`, "
        f"{len(df)} cells: {summary}.",
        "",
        "## Results",
        "",
        markdown_table(df, TABLE_COLUMNS),
        "",
    ]
    if len(failed):
        parts += ["## Cells that did not finish", "",
                  markdown_table(failed, {"cell_id": "cell", "outcome": "outcome", "error": "reason"}), ""]
    parts += [
        "## How the numbers are defined",
        "",
        "- tokens/s: non-padding tokens through the forward pass, summed over ranks, over the "
        "timed steps (warm-up steps excluded); per device = divided by the number of ranks.",
        "- peak mem: largest rank; GPU `max_memory_allocated`, CPU peak resident set.",
        "- val loss: mean next-token loss over answer tokens of the held-out split; accuracy: "
        "exact match of the whole answer (teacher-forced argmax).",
        "- wall s: launch to exit of the cell; train s: the training loop; cost: wall time x "
        "instance price x instances.",
        "",
    ]
    return "\n".join(parts)


def write(df: pd.DataFrame, out_dir: Path, meta: dict[str, Any]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    path.write_text(build_markdown(df, meta), encoding="utf-8")
    return path
