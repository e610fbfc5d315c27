"""The flow part's scores: each GPU cell's planned memory, tokens/s and wall time (what `start`
printed, `plan.csv`) against what it measured, by the report's own code (`steps.report.planned`).

    python -m steps.report.evidence.flow_scores RUNS_ROOT OUT_JSON   # after the run: score its newest run
    python -m steps.report.evidence.flow_scores --check MATRIX       # the dry run: the matrix expands, no cell refused
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

KEPT = ("report.md", "report.html", "results.csv", "plan.csv", "provenance.json")
CELLS = 4


def check(matrix_path: Path) -> list[str]:
    """The matrix parses with the flow's own parser and expands to its cells, none refused by the
    rules that need no GPU to decide; the flow file is there and Metaflow imports."""
    import importlib

    from steps.plan import compat
    from steps.plan.matrix import expand, load_matrix

    problems = []
    planned = expand(load_matrix(matrix_path))
    if len(planned) != CELLS:
        problems.append(f"{matrix_path.name}: {len(planned)} cells, not {CELLS}")
    problems += [f"{p.cell.cell_id}: refused: {p.refused}" for p in planned if p.refused]
    problems += [f"{p.cell.cell_id}: {r}" for p in planned if (r := compat.refusal(p.cell))]
    flow = Path(__file__).resolve().parents[3] / "flows" / "finetune_matrix.py"
    if not flow.exists():
        problems.append(f"{flow}: missing")
    for module in ("metaflow", "steps.flow.tasks", "steps.report.planned"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - each missing import is one problem
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    return problems


def score(runs_root: Path, out_json: Path) -> dict:
    """Score the newest run under `runs_root`; copy its report beside `out_json` (flow/)."""
    from steps.report import planned
    from steps.report.build import read_results

    folders = sorted((p for p in Path(runs_root).glob("*") if (p / "results.parquet").exists()),
                     key=lambda p: p.stat().st_mtime)
    if not folders:
        return {"finished": False, "error": f"no finished run under {runs_root}"}
    run = folders[-1]
    df, meta = read_results(run)
    table = planned.planned(df, meta)
    kept = out_json.parent / "flow"
    kept.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (run / name).exists():
            shutil.copy2(run / name, kept / name)
    cols = ["cell_id", "peft", "micro_batch", "outcome", "tokens_per_s", "mfu", "peak_mem_gb", "wall_s", "device"]
    cells = df[[c for c in cols if c in df]].to_dict("records")
    scored = table.to_dict("records") if not table.empty else []
    errors = planned.errors(table).to_dict("records") if not table.empty else []
    return {"finished": True, "run": str(run), "cells": cells, "planned_vs_measured": scored, "errors": errors}


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        problems = check(Path(argv[1]))
        print(json.dumps({"problems": problems}))
        return 1 if problems else 0
    out = Path(argv[1])
    result = score(Path(argv[0]), out)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0 if result.get("finished") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
