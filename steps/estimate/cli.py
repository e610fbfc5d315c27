"""`python -m steps.plan X.yaml`: the estimator's command line. Plans a matrix (or with
`--calibrate RUN...`, fits the planner to measured runs first) and prints the plan's table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steps.estimate import calibrate, matrix_plan
from steps.plan.matrix import load_matrix
from steps.plan.schema import ConfigError


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
        planned, plan = matrix_plan.plan_spec(spec, check=args.check, calibration=calibration)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    matrix_plan.show(planned, plan)
    return 0
