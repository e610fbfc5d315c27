"""`python -m steps.plan X.yaml`: the estimator's command line. Plans a matrix (this machine's
cells timed by the probe, every prediction calibrated on the store of measured runs) and prints
the plan's table; `--out DIR` also writes `plan.csv` there. `--calibrate RUN...` fits on those
runs instead and shows the fit against them."""

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
    parser.add_argument("--no-calibration", action="store_true",
                        help="the first-principles plan: the probe's (or the catalog's) times as they are")
    parser.add_argument("--no-probe", action="store_true", help="do not time this machine's cells")
    parser.add_argument("--calibrate", nargs="+", metavar="RUN",
                        help="fit the calibration on these runs (report folders or results tables) instead of "
                             "the store, and show the fit against them")
    parser.add_argument("--save-calibration", metavar="FILE", help="write the fit as JSON")
    parser.add_argument("--calibration", metavar="FILE", help="plan with a fit saved earlier")
    parser.add_argument("--wide", action="store_true", help="the breakdown by part in the table too")
    parser.add_argument("--out", metavar="DIR", help="write plan.csv (every column) into DIR")
    args = parser.parse_args(argv)
    calibration: calibrate.Calibration | bool | None = not args.no_calibration
    if args.calibration:
        calibration = json.loads(Path(args.calibration).read_text())
    if args.calibrate:
        rows, probes = calibrate.read_runs(args.calibrate), calibrate.run_probes(args.calibrate)
        calibration = calibrate.fit(calibrate.records(rows, probes))
        calibrate.show(calibration, calibrate.planned_vs_measured(rows, calibration, probes))
    if args.save_calibration and calibration is True:  # the store's fit, as this plan uses it
        from steps.estimate import store

        calibration = store.calibration() or False
    if args.save_calibration and isinstance(calibration, dict):
        Path(args.save_calibration).write_text(json.dumps(calibration, indent=1))
    try:
        spec = load_matrix(args.matrix)
        planned, plan = matrix_plan.plan_spec(spec, check=args.check, calibration=calibration,
                                              probe=False if args.no_probe else None,
                                              echo=lambda m: print(m, file=sys.stderr))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    matrix_plan.show(planned, plan, wide=args.wide)
    if args.out:
        print(f"plan.csv: {matrix_plan.write_csv(planned, plan, Path(args.out) / 'plan.csv')}")
    return 0
