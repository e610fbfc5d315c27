"""The comparison report, from results tables alone (so it can be rebuilt without Metaflow).

    python -m steps.report reports/<run id> [reports/<other run id> ...] --out DIR

One list of blocks (text, tables, figures) is rendered three ways: `report.md` (figures as
PNG files beside it), a self-contained `report.html` (figures inlined, no script, opens
offline) and the Metaflow card of the `end` step.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from steps import analysis, findings, memory_budget, plots

# (column, header, format) for each table; formats: text, int, num, pct, usd, x, lr, s
Cols = list[tuple[str, str, str]]
SETTINGS_COLS: Cols = [("model", "model", "text"), ("peft", "method", "text"), ("strategy", "strategy", "text"),
                       ("instance", "instance", "text"), ("world_size", "GPUs", "int")]
MAIN_COLS: Cols = SETTINGS_COLS + [
    ("lr", "lr", "lr"), ("global_batch", "global batch", "int"), ("outcome", "outcome", "text"),
    ("epoch_s", "epoch s", "s"), ("train_s", "train s", "s"), ("wall_s", "wall s", "s"),
    ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_per_device", "tokens/s per GPU", "num"),
    ("mfu", "MFU", "pct"), ("peak_mem_gb", "peak mem GB", "num"), ("val_loss", "val loss", "num"),
    ("accuracy", "accuracy", "pct"), ("cost_usd", "cost $", "usd"), ("cost_per_mtok", "$ per M tokens", "usd"),
    ("cell_id", "cell", "text"),
]


@dataclass
class Block:
    kind: str  # "text" (Markdown), "table", "image"
    text: str = ""
    table: pd.DataFrame | None = None
    columns: Cols = field(default_factory=list)
    image: Path | None = None

    def __post_init__(self):
        if self.table is not None:  # only what is shown: blocks travel as a Metaflow artifact
            self.table = self.table[[c for c, _, _ in self.columns if c in self.table.columns]]


def fmt(value: Any, kind: str = "num") -> str:
    """One cell of a table: '-' for missing, numbers to 4 significant digits."""
    if value is None or (isinstance(value, float) and pd.isna(value)) or value is pd.NA:
        return "-"
    if kind == "text" or isinstance(value, str) or isinstance(value, bool):
        return str(value)
    value = float(value)
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "usd":
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "lr":
        return f"{value:g}"
    if kind == "s":
        return f"{value:,.1f}"
    return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _rows(block: Block) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in block.columns if c[0] in block.table.columns]
    return [h for _, h, _ in cols], [[fmt(r[c], k) for c, _, k in cols] for _, r in block.table.iterrows()]


def markdown_table(block: Block) -> str:
    headers, rows = _rows(block)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def html_table(block: Block) -> str:
    """Text left, numbers right; an outcome other than ok stands out."""
    headers, rows = _rows(block)
    kinds = [k for c, _, k in block.columns if c in block.table.columns]

    def td(text: str, kind: str) -> str:
        cls = "t" if kind == "text" else "n"
        if kind == "text" and text in ("oom", "hang", "timeout", "error", "skipped"):
            cls += " bad"
        return f'<td class="{cls}">{html.escape(text)}</td>'

    head = "".join(f'<th class="{"t" if k == "text" else "n"}">{html.escape(h)}</th>' for h, k in zip(headers, kinds))
    body = "".join("<tr>" + "".join(td(c, k) for c, k in zip(r, kinds)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------- the report's content

def sections(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    sweep = analysis.lr_sweep(df)
    return {"scaling": analysis.scaling(df), "methods": analysis.methods(df), "precisions": analysis.precisions(df),
            "instances": analysis.instances(df), "instance_totals": analysis.instance_totals(df),
            "lr_sweep": sweep, "lr_scaling": analysis.lr_scaling(sweep), "batch_fit": analysis.batch_fit(df),
            "equal_tokens": analysis.equal_tokens(df), "goodput": analysis.goodput(df),
            "pareto": analysis.pareto(df), "memory_budget": memory_budget.budget(df)}


def _section(title: str, table: pd.DataFrame, cols: Cols, needs: str, intro: str = "",
             image: Path | None = None) -> list[Block]:
    out = [Block("text", f"## {title}" + (f"\n\n{intro}" if intro else ""))]
    if table.empty:
        out.append(Block("text", f"_Not in this run: needs {needs}._"))
    else:
        out.append(Block("table", table=table, columns=cols))
    if image is not None:
        out.append(Block("image", text=title, image=image))
    return out


def build(df: pd.DataFrame, meta: dict[str, Any], out_dir: Path) -> list[Block]:
    """The whole report as blocks; the figures are written under out_dir/plots."""
    df = analysis.prepare(df)
    s = sections(df)
    figs = out_dir / "plots"
    counts = ", ".join(f"{n} {k}" for k, n in sorted(df["outcome"].value_counts().items()))
    runs = ", ".join(f"`{r}`" for r in dict.fromkeys(df["run_id"].astype(str)))
    blocks = [Block("text", f"# finetune-matrix report: {meta.get('matrix', '')}\n\n"
                            f"Run(s) {runs}; {len(df)} cells: {counts}.")]
    found = findings.all_findings(s, df)
    blocks.append(Block("text", "## Key findings\n\n" + ("\n".join(f"- {f}" for f in found) if found
                                                          else "_No comparison in this run has enough finished cells._")))
    blocks.append(Block("text", "## Results\n\nEvery cell, failed ones included (outcome column)."))
    blocks.append(Block("table", table=analysis.cells(df), columns=MAIN_COLS))
    bad = analysis.failures(df)
    if len(bad):
        blocks.append(Block("text", "## Cells that did not finish"))
        blocks.append(Block("table", table=analysis.cells(bad), columns=[
            ("cell_id", "cell", "text"), ("outcome", "outcome", "text"),
            ("stopped_after_steps", "stopped after steps", "int"), ("wall_s", "wall s", "s"), ("error", "reason", "text")]))
    blocks += _section(
        "Scaling", s["scaling"], SETTINGS_COLS + [
            ("base", "against", "text"), ("tokens_per_s", "tokens/s", "num"), ("epoch_s", "epoch s", "s"),
            ("speedup", "speedup", "x"), ("epoch_speedup", "epoch speedup", "x"), ("efficiency", "efficiency", "pct"),
            ("val_loss", "val loss", "num")],
        "one configuration at two or more GPU counts",
        "Speedup: tokens/s over the smallest GPU count of the same configuration; efficiency: "
        "speedup over the GPU ratio (100% = linear).",
        plots.throughput_vs_gpus(df, figs / "throughput_vs_gpus.png"))
    blocks += _section(
        "Methods: memory and throughput", s["methods"], SETTINGS_COLS + [
            ("outcome", "outcome", "text"), ("peak_mem_gb", "peak mem GB", "num"),
            ("mem_vs_lora", "memory vs LoRA", "x"), ("tokens_per_s", "tokens/s", "num"),
            ("tokens_per_s_vs_lora", "tokens/s vs LoRA", "x"), ("val_loss", "val loss", "num")],
        "two or more methods on one configuration", "",
        plots.memory_by_method(df, figs / "peak_memory.png"))
    blocks += _section(
        "Precision", s["precisions"], SETTINGS_COLS + [
            ("precision", "precision", "text"), ("micro_batch", "micro-batch", "int"), ("outcome", "outcome", "text"),
            ("peak_mem_gb", "peak mem GB", "num"), ("mem_vs_first", "memory vs first", "x"),
            ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_vs_first", "tokens/s vs first", "x"),
            ("val_loss", "val loss", "num")],
        "one configuration at two or more precisions")
    blocks += _section(
        "Memory budget", s["memory_budget"], SETTINGS_COLS + [
            ("precision", "precision", "text"), ("micro_batch", "micro-batch", "int"), ("seq_len", "seq", "int"),
            ("weights_gb", "weights GB", "num"), ("grads_gb", "grads GB", "num"), ("optim_gb", "optimizer GB", "num"),
            ("activations_gb", "activations GB", "num"), ("estimate_gb", "estimate GB", "num"),
            ("device_gb", "GPU GB", "num"), ("fits", "fits", "text"), ("outcome", "outcome", "text"),
            ("peak_mem_gb", "measured peak GB", "num")],
        "cells of preset models that ran",
        "Per rank, worked out from the parameter counts and the settings (see `steps/memory_budget.py` for "
        "the conventions: 4 bytes per weight, 2 with bf16-true, 0.5 for a QLoRA base; AdamW 2 states per "
        "trainable parameter; activations after Korthikanti et al. 2022; sharding by strategy). On CPU the "
        "measured peak also holds the runtime (about 1 GB of libraries).")
    blocks += _section(
        "Instance types: time and cost", s["instances"], SETTINGS_COLS + [
            ("outcome", "outcome", "text"), ("price_per_hour_usd", "$ per hour", "usd"),
            ("train_s", "train s", "s"), ("wall_s", "wall s", "s"), ("tokens_per_s", "tokens/s", "num"),
            ("cost_usd", "cost $", "usd"), ("cost_per_mtok", "$ per M tokens", "usd"), ("val_loss", "val loss", "num")],
        "one configuration on two or more instance types")
    blocks.append(Block("table", table=s["instance_totals"], columns=[
        ("instance", "instance", "text"), ("accelerator", "accelerator", "text"),
        ("price_per_hour_usd", "$ per hour", "usd"), ("cells", "cells", "int"), ("ok", "ok", "int"),
        ("wall_s", "wall s (all cells)", "s"), ("cost_usd", "cost $ (all cells)", "usd")]))
    blocks += _section(
        "Learning rate", s["lr_sweep"], SETTINGS_COLS + [
            ("global_batch", "global batch", "int"), ("lr", "lr", "lr"), ("outcome", "outcome", "text"),
            ("val_loss", "val loss", "num"), ("best", "best", "text"), ("at_edge", "at grid edge", "text")],
        "one configuration at two or more learning rates", "",
        plots.lr_sweep(s["lr_sweep"], figs / "lr_sweep.png"))
    if not s["lr_scaling"].empty:
        blocks.append(Block("text", "Best learning rate against global batch, fitted as lr ~ batch^k "
                                    "(linear scaling rule: k = 1, square-root rule: k = 0.5):"))
        blocks.append(Block("table", table=s["lr_scaling"], columns=[
            ("model", "model", "text"), ("peft", "method", "text"), ("best_lrs", "batch:best lr", "text"),
            ("exponent", "k", "num"), ("closest_rule", "closest rule", "text"), ("any_at_edge", "edge of grid", "text")]))
    blocks += _section(
        "Batch size", s["batch_fit"], SETTINGS_COLS[:4] + [
            ("world_size", "GPUs", "int"), ("tried", "micro-batches tried", "text"),
            ("largest_ok", "largest that fit", "int"), ("peak_mem_gb_at_largest", "its peak mem GB", "num"),
            ("first_failed", "first that failed", "int"), ("failed_as", "failed as", "text")],
        "one configuration at two or more micro-batch sizes")
    if not s["equal_tokens"].empty:
        blocks.append(Block("text", "Training loss after the same number of tokens (mean over the last 10% of them):"))
        blocks.append(Block("table", table=s["equal_tokens"], columns=SETTINGS_COLS + [
            ("micro_batch", "micro-batch", "int"), ("grad_accum", "accum", "int"), ("global_batch", "global batch", "int"),
            ("lr", "lr", "lr"), ("tokens", "tokens", "int"), ("loss_at_tokens", "train loss", "num"),
            ("val_loss", "final val loss", "num")]))
    blocks += _section(
        "Goodput and time to target", s["goodput"], SETTINGS_COLS + [
            ("lr", "lr", "lr"), ("tokens_per_s", "tokens/s", "num"), ("updates_per_s", "updates/s", "num"),
            ("samples_per_s", "samples/s", "num"), ("target_loss", "target loss", "num"),
            ("time_to_target_s", "time to target s", "s"), ("tokens_to_target", "tokens to target", "int"),
            ("steps_to_target", "steps to target", "int"), ("val_loss", "val loss", "num")],
        "finished cells",
        "Goodput: optimizer updates (and samples) per second of training. Target: the matrix's "
        "`train.target_loss` (validation loss when evaluated during training), else the median of the "
        f"finished cells' final training losses (mean of the last {analysis.SMOOTH_WINDOW} steps): half of them reach it.")
    curves = plots.loss_curves(df, figs / "loss_curves.png")
    if curves is not None:
        blocks += [Block("text", "## Loss curves"), Block("image", text="Loss curves", image=curves)]
    blocks += _section(
        "Cost, time and loss: the Pareto set", s["pareto"], SETTINGS_COLS + [
            ("lr", "lr", "lr"), ("global_batch", "global batch", "int"), ("cost_usd", "cost $", "usd"),
            ("wall_s", "wall s", "s"), ("val_loss", "val loss", "num"), ("pareto", "Pareto-optimal", "text")],
        "finished cells with a cost",
        "A cell is Pareto-optimal when no other is at least as cheap, as fast and as low in validation "
        "loss, and better in one.", plots.cost_vs_time(s["pareto"], figs / "cost_vs_time.png"))
    blocks.append(Block("text", DEFINITIONS))
    blocks.append(Block("text", _provenance(meta)))
    return blocks


DEFINITIONS = """## How the numbers are defined

- tokens/s: non-padding tokens through the forward pass, summed over ranks, over the timed steps
  (warm-up steps excluded); per GPU = divided by the number of ranks.
- MFU: achieved model FLOP/s over the catalog's dense peak of the devices used (fp16 peak for
  fp16-mixed, bf16 for bf16, fp32 for fp32). FLOPs per token: 6N for full fine-tuning, 4N + 6N
  trainable with a frozen base (no weight gradients for frozen weights), plus the attention term
  12·L·H·Q·T (scaled the same way). No MFU on CPU: no published peak.
- peak mem: the largest rank's; GPU `max_memory_allocated`, CPU the process's peak resident set.
- val loss: mean next-token loss over the answer tokens of the held-out split; accuracy: exact match
  of the whole answer (teacher-forced argmax).
- epoch s: time per step x steps per epoch; train s: the training loop; wall s: launch to exit.
- cost: wall time x the catalog's on-demand price x instances (local CPU types: x devices, at a
  reference cloud price); $ per M tokens: cost over the tokens trained.
"""


def _provenance(meta: dict[str, Any]) -> str:
    lines = ["## Provenance", ""]
    for key in ("run_id", "flow", "matrix", "matrix_sha256", "git_commit"):
        if meta.get(key):
            lines.append(f"- {key}: `{meta[key]}`")
    if meta.get("sources"):
        lines.append("- tables: " + ", ".join(f"`{s}`" for s in meta["sources"]))
    if meta.get("versions"):
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    return "\n".join(lines)


# ---------------------------------------------------------------- renderings

def to_markdown(blocks: list[Block], out_dir: Path) -> str:
    parts = []
    for b in blocks:
        if b.kind == "text":
            parts.append(b.text)
        elif b.kind == "table":
            parts.append(markdown_table(b))
        else:
            parts.append(f"![{b.text}]({b.image.relative_to(out_dir).as_posix()})")
    return "\n\n".join(parts) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 7px;white-space:nowrap}
th{background:#f0f0f0}.n{text-align:right}.t{text-align:left}.bad{background:#fde2e2;color:#a00}
img{max-width:100%;border:1px solid #ddd;margin:0.5em 0}code{background:#f4f4f4;padding:0 3px}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:0.2em;margin-top:1.6em}"""


def to_html(blocks: list[Block], title: str) -> str:
    """One file: figures as data: URIs, styles inline, no script, nothing fetched."""
    import markdown

    body = []
    for b in blocks:
        if b.kind == "text":
            body.append(markdown.markdown(b.text))
        elif b.kind == "table":
            body.append(html_table(b))
        else:
            data = base64.b64encode(b.image.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}"></figure>')
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def card_components(blocks: list[Block]) -> list:
    """The same report as Metaflow card components (for the `end` step's card)."""
    from metaflow.cards import Image, Markdown, Table

    out = []
    for b in blocks:
        if b.kind == "text":
            out.append(Markdown(b.text))
        elif b.kind == "table":
            headers, rows = _rows(b)
            out.append(Table(rows, headers=headers))
        else:
            out.append(Image(b.image.read_bytes(), label=b.text))
    return out


def write(df: pd.DataFrame, out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    """report.md, report.html and plots/ under out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_blocks(build(df, meta, out_dir), out_dir, meta)


def write_blocks(blocks: list[Block], out_dir: Path, meta: dict[str, Any]) -> dict[str, Path]:
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(to_markdown(blocks, out_dir), encoding="utf-8")
    page.write_text(to_html(blocks, f"finetune-matrix report: {meta.get('matrix', '')}"), encoding="utf-8")
    return {"report": md, "html": page, "plots": out_dir / "plots"}


# ---------------------------------------------------------------- the command line

def read_results(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A results table (Parquet or CSV) or a run folder holding one, and its provenance."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        path = next((p for p in (path / "results.parquet", path / "results.csv") if p.exists()), None)
        if path is None:
            raise FileNotFoundError(f"{folder}: no results.parquet or results.csv")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    prov = folder / "provenance.json"
    meta = json.loads(prov.read_text()) if prov.exists() else {}
    return df, {**meta, "source": str(path)}


def combine(tables: list[tuple[pd.DataFrame, dict[str, Any]]]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Several runs as one table, joined by cell_id: a cell in more than one run keeps its
    finished row from the latest run that finished it (else its latest row)."""
    df = pd.concat([t for t, _ in tables], ignore_index=True)
    df["_order"] = range(len(df))
    df["_ok"] = df["outcome"] == "ok"
    df = (df.sort_values(["_ok", "_order"]).groupby("cell_id", sort=False).tail(1)
          .sort_values("_order").drop(columns=["_order", "_ok"]).reset_index(drop=True))
    metas = [m for _, m in tables]
    names = list(dict.fromkeys(m.get("matrix") or "" for m in metas))
    meta = {"matrix": " + ".join(n for n in names if n) or "results",
            "run_id": ", ".join(dict.fromkeys(str(r) for r in df["run_id"])),
            "sources": [m["source"] for m in metas]}
    if len(metas) == 1:
        meta = {**metas[0], **meta, "run_id": metas[0].get("run_id", meta["run_id"])}
    return df, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m steps.report", description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+", type=Path, help="results.parquet / results.csv, or a run folder")
    p.add_argument("--out", type=Path, required=True, help="folder for report.md, report.html and plots/")
    args = p.parse_args(argv)
    try:
        df, meta = combine([read_results(r) for r in args.results])
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write(df, args.out, meta)
    print(f"{len(df)} cells -> {paths['report']}\n{' ' * len(str(len(df)))}          {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
