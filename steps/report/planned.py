"""Planned vs measured: what `start` printed before this run (`plan.csv` in the run's folder:
the probe's times and the calibration it used, each with its interval) beside what each cell
measured, whether the measured value fell inside the interval, and the planner's overall error
for the run. A run from before plans were kept is planned again from first principles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from steps.estimate import calibrate

WHAT = ("mem_gb", "tokens_per_s", "wall_s", "cost_usd")
PLAN_CSV = calibrate.PLAN_CSV


def plan_of(folder: Path | str) -> pd.DataFrame | None:
    """The plan `start` wrote into a run's folder, or None."""
    path = Path(folder) / PLAN_CSV
    return pd.read_csv(path, keep_default_na=False, na_values=[""]) if path.exists() else None


def _plans(meta: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Each cell's row of the plan(s) its run printed, by cell id (a later run's wins)."""
    out: dict[str, dict[str, Any]] = {}
    for path in (meta or {}).get("plan_csvs") or [(meta or {}).get("plan_csv")]:
        if path and Path(path).exists():
            plan = plan_of(Path(path).parent)
            for _, r in plan.iterrows():
                row = r.to_dict()
                for what in ("tokens_per_s", "wall_s", "cost_usd"):
                    low, high = row.get(f"{what}_low"), row.get(f"{what}_high")
                    row[f"{what}_range"] = None if pd.isna(low) or pd.isna(high) else (float(low), float(high))
                out[str(r["cell_id"])] = row
    return out


def planned(df: pd.DataFrame, meta: dict[str, Any] | None = None) -> pd.DataFrame:
    """One row per cell that trained (to the end, or a speed cell's steps) and has a plan: the
    run's own where it kept one, else a first-principles re-plan of cells whose shape is known."""
    if df.empty or "step_s" not in df:
        return pd.DataFrame()
    plans = _plans(meta)
    try:
        if not plans:  # first principles, with the probe entries the run's folder keeps (twins: probe.json)
            sources = (meta or {}).get("sources") or [(meta or {}).get("source")]
            probes = calibrate.run_probes([Path(s).parent for s in sources if s])
            table = calibrate.planned_vs_measured(df, None, probes)
            return _inside(table.assign(plan="re-planned")) if not table.empty else table
        rows = [calibrate.score(cell, r, plans[r["cell_id"]]) for cell, r in calibrate.measured(df)
                if r["cell_id"] in plans]
    except (KeyError, ValueError):  # a table from before the settings were columns
        return pd.DataFrame()
    return _inside(pd.DataFrame(rows).assign(plan="as printed")) if rows else pd.DataFrame()


def _inside(table: pd.DataFrame) -> pd.DataFrame:
    """yes / no columns for the report: the measured value within the planned interval (every
    column the section shows, empty where a cell had no interval)."""
    for what, col in (("tokens_per_s", "tokens_in"), ("wall_s", "wall_in")):
        for side in ("low", "high", "inside"):
            if f"{what}_{side}" not in table:
                table[f"{what}_{side}"] = None
        table[col] = table[f"{what}_inside"].map({True: "yes", False: "no"})
    return table


def errors(table: pd.DataFrame) -> pd.DataFrame:
    """The planner's error over the run: median and largest |planned / measured - 1| per
    quantity, over the cells that have both, and the share of measured values inside the
    planned interval."""
    rows = []
    for what in WHAT:
        col = f"{what}_error"
        if col in table and table[col].notna().any():
            err = table[col].dropna().abs()
            inside = table[f"{what}_inside"].dropna() if f"{what}_inside" in table else pd.Series(dtype=bool)
            rows.append({"quantity": what, "cells": len(err), "median_abs_error": err.median(),
                         "max_abs_error": err.max(),
                         "inside": float(inside.astype(bool).mean()) if len(inside) else None})
    return pd.DataFrame(rows)
