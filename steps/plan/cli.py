"""The planner's command line and the flow's `start` table: expand a matrix, check it (the
models' facts are read only for models that are not presets), predict every cell."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from steps.plan import catalog, planner
from steps.plan.matrix import expand, load_matrix
from steps.plan.schema import ConfigError, MatrixSpec


def plan_spec(spec: MatrixSpec, check: str = "auto") -> tuple[list, planner.MatrixPlan]:
    """The matrix's cells (refusals from the models' facts and the `plan:` settings applied)
    and their plans.

    check: `always` reads the models' facts and runs every pre-launch check (the flow's
    `start`); `auto` reads facts only for models that are not presets (their shape comes from
    there; presets' from the catalog, so a matrix of presets plans without loading torch);
    `never` reads none.
    """
    from steps.plan import preflight

    planned = expand(spec)
    presets = catalog.model_presets()
    needed = check == "always" or (check == "auto" and any(p.cell.model not in presets for p in planned))
    facts: dict[str, Any] = preflight.gather_facts([p.cell for p in planned]) if needed else {"models": {}}
    if needed:
        planned = preflight.check(spec, planned, facts)
    matrix_plan = planner.plan_matrix(planned, facts["models"], spec.compute)
    planned = planner.apply_settings(spec, planned, matrix_plan)
    return planned, matrix_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict memory, time and cost of every cell of a matrix.")
    parser.add_argument("matrix", help="matrix YAML file")
    parser.add_argument("--check", choices=("auto", "always", "never"), default="auto",
                        help="read the models' facts and check models, adapters and data: only for models "
                             "that are not presets (auto), always (as the flow's start does), never")
    args = parser.parse_args(argv)
    try:
        spec = load_matrix(args.matrix)
        planned, matrix_plan = plan_spec(spec, check=args.check)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    planner.show(planned, matrix_plan)
    return 0
