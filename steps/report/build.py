"""The comparison report, from results tables alone (so it can be rebuilt without Metaflow).

    python -m steps.report reports/<run id> [reports/<other run id> ...] --out DIR

`build` makes one list of blocks (text, tables, figures): the counts, the key findings, every
cell, the failures, then the sections of `steps/report/sections.py` in order. `render` writes
them three ways: `report.md` (figures as PNG files beside it), a self-contained `report.html`
(figures inlined, no script, opens offline) and the Metaflow card of the `end` step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from steps.report import analysis, decision, economy, findings, memory_budget, planned, projected, validity
from steps.report.render import Block, card_components, fmt, to_html, to_markdown
from steps.report.sections import (
    CLASS_COLS,
    DEFINITIONS,
    DIVERGED_COL,
    ECONOMY_CLASS_COLS,
    ECONOMY_RESULTS_COLS,
    FAILED_COLS,
    RESULTS_COLS,
    SAVING_COLS,
    SECTIONS,
    Section,
)

# card_components and fmt: the flow's card and callers of `build` render through this module too.
__all__ = ["Block", "build", "card_components", "combine", "fmt", "main", "read_results", "sections", "write",
           "write_blocks"]


def sections(df: pd.DataFrame, meta: dict[str, Any] | None = None) -> dict[str, pd.DataFrame]:
    """The derived tables the sections show and the findings quote, by key."""
    sweep = analysis.lr_sweep(df)
    return {"scaling": analysis.scaling(df), "methods": analysis.methods(df), "precisions": analysis.precisions(df),
            "instances": analysis.instances(df), "instance_totals": analysis.instance_totals(df),
            "lr_sweep": sweep, "lr_scaling": analysis.lr_scaling(sweep), "batch_fit": analysis.batch_fit(df),
            "equal_tokens": analysis.equal_tokens(df), "goodput": analysis.goodput(df),
            "pareto": analysis.pareto(df), "memory_budget": memory_budget.budget(df),
            "planned": (plan_table := planned.planned(df, meta)), "planned_errors": planned.errors(plan_table),
            "settings": analysis.settings(df), "classes": economy.classes(df)}


def build(df: pd.DataFrame, meta: dict[str, Any], out_dir: Path) -> list[Block]:
    """The whole report as blocks; the figures are written under out_dir/plots."""
    df = economy.with_classes(analysis.prepare(df))  # each row's class, worked out once
    tables = sections(df, meta)
    counts = ", ".join(f"{n} {k}" for k, n in sorted(df["outcome"].value_counts().items()))
    runs = ", ".join(f"`{r}`" for r in dict.fromkeys(df["run_id"].astype(str)))
    found = findings.all_findings(tables, df)
    shared = economy.has_economy(df)
    costs = economy.saving(df, meta) if shared else None
    lead = economy.finding(costs, tables["classes"]) if shared else []  # said before the ranked findings
    results_cols = RESULTS_COLS
    if shared:  # the class's numbers, where they come from and how far its members can differ
        at = next(i for i, (c, _, _) in enumerate(RESULTS_COLS) if c == "accuracy") + 1
        results_cols = RESULTS_COLS[:at] + ECONOMY_RESULTS_COLS + RESULTS_COLS[at:]
    goals, default = decision.goals_of(meta)
    decided = decision.decide(df, goals, default)
    out_dir.mkdir(parents=True, exist_ok=True)
    projection = projected.project(meta)  # the goals at full scale, predicted (`report.project_to`)
    decision.write(decided, out_dir, projection and projection.to_json())  # the contract other tools read
    blocks = [Block("text", f"# finetune-matrix report: {meta.get('matrix', '')}\n\n"
                            f"Run(s) {runs}; {len(df)} cells: {counts}."),
              Block("text", decision.section(decided, df, default)),
              *validity.blocks(df),  # what the run cannot speak for (CPU, small, random, short, capped, busy)
              *([Block("text", projected.section(projection))] if projection else []),
              Block("text", findings.section(found, lead)),
              Block("text", "## Results\n\nEvery cell, failed ones included (outcome column)."),
              Block("table", table=analysis.cells(economy.annotate(df, tables["classes"])), columns=results_cols)]
    bad = analysis.failures(df)
    if len(bad):
        diverged = [DIVERGED_COL] if (bad["outcome"] == "diverged").any() else []
        blocks += [Block("text", "## Cells that did not finish"),
                   Block("table", table=analysis.cells(bad), columns=FAILED_COLS[:3] + diverged + FAILED_COLS[3:])]
    blocks += _classes_blocks(tables["classes"], df, costs)
    for section in SECTIONS:
        blocks += _section_blocks(section, tables, df, out_dir / "plots")
    return blocks + [Block("text", DEFINITIONS), Block("text", _provenance(meta))]


def _classes_blocks(table: pd.DataFrame, df: pd.DataFrame, costs: pd.DataFrame | None) -> list[Block]:
    """Under `economy:`, what was shared and the saving; in any run with classes of two or more
    members, how far apart the members ended."""
    if costs is not None:
        return [Block("text", "## Economy: shared quality\n\n" + economy.summary(df, table, costs)),
                Block("table", table=costs, columns=SAVING_COLS),
                Block("table", table=table, columns=ECONOMY_CLASS_COLS)]
    if table.empty:
        return []
    return [Block("text", "## Equivalent cells: how far apart they ended\n\n" + economy.CLASSES_INTRO),
            Block("table", table=table, columns=CLASS_COLS)]


def _section_blocks(section: Section, tables: dict[str, pd.DataFrame], df: pd.DataFrame,
                    plots_dir: Path) -> list[Block]:
    """One section: heading and intro, its table or what the run lacks for one, its figure
    (drawn into plots_dir), then its follow-up tables."""
    fig = section.figure
    image = fig and fig.plot(tables[section.table] if fig.of_section else df, plots_dir / fig.file)
    figure = [Block("image", text=section.title, image=image)] if image else []
    if section.table is None:  # a figure alone
        return [Block("text", f"## {section.title}")] + figure if figure else []
    table = tables[section.table]
    if table.empty and section.only_with_data:
        return []
    out = [Block("text", f"## {section.title}" + (f"\n\n{section.intro}" if section.intro else "")),
           Block("text", f"_Not in this run: needs {section.needs}._") if table.empty
           else Block("table", table=table, columns=section.columns)]
    out += _shared(section.columns, table, df) + figure
    for extra in section.follow_ups:
        if extra.always or not tables[extra.table].empty:
            out += [Block("text", extra.lead)] if extra.lead else []
            out.append(Block("table", table=tables[extra.table], columns=extra.columns))
            out += _shared(extra.columns, tables[extra.table], df)
    return out


def _shared(columns: list, table: pd.DataFrame, df: pd.DataFrame) -> list[Block]:
    note = economy.shared_note([c for c, _, _ in columns], table, df)
    return [Block("text", note)] if note else []


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
    plan = folder / planned.PLAN_CSV  # what start printed: the report scores it
    return df, {**meta, "source": str(path), "plan_csv": str(plan) if plan.exists() else None}


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
            "sources": [m["source"] for m in metas], "plan_csvs": [m.get("plan_csv") for m in metas]}
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

