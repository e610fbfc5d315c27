"""Planned vs measured: what `python -m steps.plan` would have said before the run (its
default efficiencies, no calibration) beside what each cell measured, and the planner's
overall error for the run."""

from __future__ import annotations

import pandas as pd

from steps.estimate import calibrate

WHAT = ("mem_gb", "tokens_per_s", "wall_s", "cost_usd")


def planned(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell that trained to the end and whose model's shape is known."""
    if df.empty or "step_s" not in df:
        return pd.DataFrame()
    try:
        return calibrate.planned_vs_measured(df)
    except (KeyError, ValueError):  # a table from before the settings were columns
        return pd.DataFrame()


def errors(table: pd.DataFrame) -> pd.DataFrame:
    """The planner's error over the run: median and largest |planned / measured - 1| per
    quantity, over the cells that have both."""
    rows = []
    for what in WHAT:
        col = f"{what}_error"
        if col in table and table[col].notna().any():
            err = table[col].dropna().abs()
            rows.append({"quantity": what, "cells": len(err), "median_abs_error": err.median(),
                         "max_abs_error": err.max()})
    return pd.DataFrame(rows)
