"""The planner's command line and the flow's `start` table: expand a matrix, check it (the
models' facts are read only for models that are not presets), predict every cell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from steps.plan import calibrate, catalog, planner
from steps.plan.matrix import expand, load_matrix
from steps.plan.schema import ConfigError, MatrixSpec


def plan_spec(spec: MatrixSpec, check: str = "auto",
              calibration: calibrate.Calibration | None = None) -> tuple[list, planner.MatrixPlan]:
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
    predict_cell = None
    if calibration:
        def predict_cell(cell):
            return calibrate.predict(cell, calibration, spec.compute, facts["models"], fixes=True)
    matrix_plan = planner.plan_matrix(planned, facts["models"], spec.compute, predict_cell)
    planned = planner.apply_settings(spec, planned, matrix_plan)
    return planned, matrix_plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Predict memory, time and cost of every cell of a matrix.")
    parser.add_argument("matrix", help="matrix YAML file")
    parser.add_argument("--check", choices=("auto", "always", "never"), default="auto",
                        help="read the models' facts and check models, adapters and data: only for models "
                             "that are not presets (auto), always (as the flow's start does), never")
    parser.add_argument("--calibrate", nargs="+", metavar="RUN",
                        help="fit the per-step overhead and efficiency from these runs (report folders or "
                             "results tables) and plan with them")
    parser.add_argument("--save-calibration", metavar="FILE", help="write the fit as JSON")
    parser.add_argument("--calibration", metavar="FILE", help="plan with a fit saved earlier")
    args = parser.parse_args(argv)
    calibration = None
    if args.calibration:
        calibration = json.loads(Path(args.calibration).read_text())
    if args.calibrate:
        rows = calibrate.read_runs(args.calibrate)
        calibration = calibrate.fit(rows)
        calibrate.show(calibration, calibrate.planned_vs_measured(rows, calibration))
        if args.save_calibration:
            Path(args.save_calibration).write_text(json.dumps(calibration, indent=1))
    try:
        spec = load_matrix(args.matrix)
        planned, matrix_plan = plan_spec(spec, check=args.check, calibration=calibration)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    planner.show(planned, matrix_plan)
    return 0
