"""Equivalence classes in the report: how far apart a class's members ended where two or more
trained to the end (its spread), and, under `economy:`, what the speed cells share, from which
cell, and what the run saved against training every cell to the end.

The spread is the evidence that sharing is safe: the strategy tests prove a class's members
equal over a few steps (fp32 within 1e-4, bf16 within 5e-3), but a long run can amplify
rounding (a loss spike at a learning rate near the edge of stability). An economy run trains
one member per class to the end, so it cannot measure its classes' spreads itself; it states
the largest spread the saved study twins' full runs measured at the same precision
(`SPREAD_EVIDENCE`, rebuilt by `python -m steps.report.economy` and checked by a test), and
how far each speed cell's own curve parted from its quality run's over the steps both trained.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steps.estimate import calibrate
from steps.plan import equivalence

# The strategy tests' tolerance on the losses (tests/test_strategies.py): fp32, else bf16's.
FP32_TOLERANCE, BF16_TOLERANCE = 1e-4, 5e-3
TOLERANCE_TEXT = "fp32 within 1e-4, bf16 within 5e-3"
CLASSES_INTRO = (
    "Cells that must give the same losses (one model, method, precision, learning rate and schedule, global "
    "batch, steps, seeds and data: `steps/plan/equivalence.py`), and how far apart their validation ended. The "
    f"strategy tests prove them equal over a few steps ({TOLERANCE_TEXT}); over a whole run "
    "rounding can grow (through a loss spike), and the spread says by how much. `economy:` trains one cell per "
    "class to the end and shares its numbers.")
SPREAD_EVIDENCE = Path(__file__).with_name("spread_evidence.json")
# The numbers a speed cell takes from its class's quality run, as the report's columns name them.
SHARED_COLS = {"val_loss": "val loss", "accuracy": "accuracy", "time_to_target_s": "time to target",
               "tokens_to_target": "tokens to target", "steps_to_target": "steps to target",
               "loss_at_tokens": "train loss at equal tokens"}


def has_economy(df: pd.DataFrame) -> bool:
    """Whether the table holds speed cells (an `economy:` run)."""
    return "quality_from" in df and bool(df["quality_from"].notna().any())


def _class_of(row: Any) -> str | None:
    if isinstance(row.get("quality_class"), str):
        return row["quality_class"]
    try:
        return equivalence.quality_class(calibrate.cell_of_row(row))
    except (KeyError, ValueError, TypeError):  # a table from before the settings were columns
        return None


def _describe(row: Any) -> str:
    try:
        return equivalence.describe(calibrate.cell_of_row(row))
    except (KeyError, ValueError, TypeError):
        return ""


def _curve(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str) and value:
        return json.loads(value)
    return list(value) if isinstance(value, list) else []


def curve_gap(speed_curve: list[dict[str, Any]], quality_curve: list[dict[str, Any]]) -> float | None:
    """Largest relative difference of the training losses over the steps both curves have."""
    theirs = {p["step"]: p["loss"] for p in quality_curve}
    gaps = [abs(p["loss"] - theirs[p["step"]]) / abs(theirs[p["step"]]) for p in speed_curve
            if p["step"] in theirs and theirs[p["step"]]]
    return max(gaps) if gaps else None


def evidence() -> dict[str, dict[str, Any]]:
    """The largest class spread per precision on the saved twins' full runs (empty if absent)."""
    return json.loads(SPREAD_EVIDENCE.read_text()) if SPREAD_EVIDENCE.exists() else {}


def with_classes(df: pd.DataFrame) -> pd.DataFrame:
    """The table with every row's class in `quality_class`: an economy run's rows carry theirs,
    a full run's are worked out from their settings (once: a table that has them all is kept)."""
    if "quality_class" in df and df["quality_class"].map(lambda v: isinstance(v, str)).all():
        return df
    return df.assign(quality_class=[_class_of(r) for _, r in df.iterrows()])


def classes(df: pd.DataFrame) -> pd.DataFrame:
    """One row per class of two or more members: its members, how many trained to the end
    (their own validation), the spread of their validation loss and accuracy, and under
    `economy:` the quality run and its speed cells' largest curve gap. A class measured by one
    member only has the twins' spread at its precision (`spread_from`)."""
    if df.empty:
        return pd.DataFrame()
    df = with_classes(df)
    known = evidence()
    rows = []
    for key, g in df[df["quality_class"].notna()].groupby("quality_class", sort=False):
        if len(g) < 2:
            continue
        ok = g[g["outcome"] == "ok"]
        own = ok[ok["quality_from"].isna()] if "quality_from" in ok else ok
        speed = ok[ok["quality_from"].notna()] if "quality_from" in ok else ok.iloc[:0]
        quality = own.iloc[0] if len(own) == 1 and len(speed) else None
        precision = g.iloc[0]["precision"]
        measured = len(own) >= 2 and own["val_loss"].notna().sum() >= 2
        ref = known.get(precision) if not measured and len(speed) else None  # an economy class
        gaps = [curve_gap(_curve(s.get("speed_curve")), _curve(quality["loss_curve"]))
                for _, s in speed.iterrows()] if quality is not None else []
        gaps = [x for x in gaps if x is not None]
        rows.append({
            "quality_class": key, "shares": _describe(g.iloc[0]), "precision": precision, "members": len(g),
            "ok": len(ok), "trained": len(own), "speed_cells": len(speed),
            "quality_from": quality["cell_id"] if quality is not None else None,
            "val_loss": own["val_loss"].median() if len(own) else np.nan,
            "val_loss_min": own["val_loss"].min() if measured else np.nan,
            "val_loss_max": own["val_loss"].max() if measured else np.nan,
            "spread": (own["val_loss"].max() - own["val_loss"].min()) if measured
            else (ref["spread"] if ref else np.nan),
            "accuracy_spread": (own["accuracy"].max() - own["accuracy"].min()) if measured else np.nan,
            "spread_from": "this run" if measured else (f"twins' largest ({precision})" if ref else "-"),
            "curve_gap": max(gaps) if gaps else np.nan,
            "curve_steps": int(speed["train_steps"].max()) if len(speed) and "train_steps" in speed else np.nan,
        })
    return pd.DataFrame(rows)


def annotate(df: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The results table with each row's class spread (from `classes`), for the column beside
    the shared values."""
    if table.empty:
        return df.assign(class_spread=np.nan)
    spread = dict(zip(table["quality_class"], table["spread"], strict=True))
    return df.assign(class_spread=with_classes(df)["quality_class"].map(spread))


def saving(df: pd.DataFrame, meta: dict[str, Any]) -> pd.DataFrame:
    """This run's training seconds, device seconds and cost against a full run of the matrix:
    as the planner predicted before launch (the provenance's `economy_plan`) and from the
    measured speed cells, projected to their full runs (`analysis.project_speed_cells`). `df`:
    the prepared results table (`analysis.prepare`)."""
    ran = df[(df["outcome"] != "skipped") & df["ran_wall_s"].notna()]
    this = {"train_s": ran["ran_train_s"].sum(), "device_s": (ran["ran_wall_s"] * ran["world_size"]).sum(),
            "cost_usd": ran["ran_cost_usd"].sum(min_count=len(ran))}
    full = {"train_s": ran["train_s"].sum(), "device_s": (ran["wall_s"] * ran["world_size"]).sum(),
            "cost_usd": ran["cost_usd"].sum(min_count=len(ran))}
    plan = meta.get("economy_plan") or {}
    names = {"train_s": ("training s", "train_s", "full_train_s"),
             "device_s": ("device s", "device_s", "full_device_s"),
             "cost_usd": ("cost $", "cost_usd", "full_cost_usd")}
    rows = []
    for key, (label, planned, planned_full) in names.items():
        p, pf = plan.get(planned), plan.get(planned_full)
        rows.append({"quantity": label, "this_run": this[key], "full_measured": full[key],
                     "ratio_measured": this[key] / full[key] if full[key] else np.nan,
                     "planned": p if p is not None else np.nan, "full_planned": pf if pf is not None else np.nan,
                     "ratio_planned": p / pf if p is not None and pf else np.nan})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame, table: pd.DataFrame, costs: pd.DataFrame) -> str:
    """The economy section's opening: what ran how, what is shared, and the saving in words."""
    speed = df[df["quality_from"].notna()]
    steps = sorted({int(s) for s in speed["train_steps"].dropna()})
    quality = sum(1 for q in table["quality_from"] if isinstance(q, str)) if not table.empty else 0
    by = costs.set_index("quantity")

    def line(label: str, name: str, unit: str) -> str:
        r = by.loc[label]
        fmt = (lambda v: f"${v:.4g}") if unit == "$" else (lambda v: f"{v:,.1f} {unit}")
        planned = (f"; as planned before launch, {fmt(r.planned)} against {fmt(r.full_planned)} "
                   f"({r.ratio_planned:.2f}x)" if pd.notna(r.ratio_planned) else "")
        return (f"{name}: {fmt(r.this_run)} against {fmt(r.full_measured)} for every cell to the end as its speed "
                f"cells measured it ({r.ratio_measured:.2f}x){planned}")

    return (f"`economy:` trained {quality} {'cell' if quality == 1 else 'cells'} to the end, one per equivalence "
            f"class of two or more members, and {len(speed)} speed {'cell' if len(speed) == 1 else 'cells'} for "
            f"{', '.join(map(str, steps)) or '?'} steps of their class's schedule. "
            "A speed cell's tokens/s, MFU, peak memory and step time are its own; its validation loss, accuracy, "
            "curves and steps and tokens to target are its class's quality run's (`quality from`), and its time "
            "to target is those steps at its own step time. So that every table compares configurations trained "
            "to the end, a speed cell's train s, wall s and cost in them are its full run's: what it ran (`wall "
            "s as run` under Results) plus the steps it skipped at its own measured step time and its class's "
            "evaluation time.\n\n"
            f"The saving. {line('device s', 'Device time', 'device-s')}. {line('cost $', 'Cost', '$')}. "
            f"{line('training s', 'Training time', 's')}.\n\n"
            "Spread: how far apart the class's members ended where two or more trained to the end; where one did "
            "(the economy), the largest spread the saved study twins' full runs measured at that precision. "
            "Curve gap: the largest relative difference between a speed cell's training loss and its quality "
            "run's over the steps both trained (the strategy tests' tolerance: 1e-4 fp32, 5e-3 bf16).")


def shared_note(section_cols: list[str], table: pd.DataFrame, df: pd.DataFrame) -> str | None:
    """Which of a section's numbers are shared, for a section that shows any of them."""
    names = [SHARED_COLS[c] for c in section_cols if c in SHARED_COLS]
    if not names or not has_economy(df) or table.empty:
        return None
    speed = set(df.loc[df["quality_from"].notna(), "cell_id"])
    count = (f"{int(table['cell_id'].isin(speed).sum())} of {len(table)} rows are speed cells: their "
             if "cell_id" in table else "The speed cells' ")
    timing = (" (time to target: the class's steps at the cell's own step time)"
              if "time_to_target_s" in section_cols else "")
    verb = "come" if len(names) > 1 else "comes"
    return (f"_Shared under `economy:`: {count}{', '.join(names)} {verb} from their class's quality run{timing}; "
            "see `quality from` and `class spread` under Results._")


def finding(costs: pd.DataFrame, table: pd.DataFrame) -> list[str]:
    """The key finding of an economy run: the saving, and any class whose speed cells parted
    from the quality run by more than the strategy tests' tolerance."""
    by = costs.set_index("quantity")
    d = by.loc["device s"]
    planned = f"; planned {d.ratio_planned:.2f}x" if pd.notna(d.ratio_planned) else ""
    out = [f"Economy: this run used {d.this_run:,.0f} device-seconds against {d.full_measured:,.0f} for every "
           f"cell to the end ({d.ratio_measured:.2f}x{planned})."]
    for _, r in table.iterrows():
        tol = FP32_TOLERANCE if r["precision"] == "fp32" else BF16_TOLERANCE
        if pd.notna(r["curve_gap"]) and r["curve_gap"] > tol:
            out.append(f"Class {r['quality_class']} ({r['shares']}): its speed cells' training loss parted from "
                       f"{r['quality_from']}'s by up to {r['curve_gap']:.2g} (relative) within {int(r['curve_steps'])} "
                       f"steps, more than the strategy tests' {tol:g}: rounding grown by a loss spike, or a real "
                       "difference; `quality: every` measures the class's spread.")
    return out


def measure_evidence(folders: list[Path]) -> dict[str, dict[str, Any]]:
    """From full runs' results: the largest class spread per precision, and where."""
    best: dict[str, dict[str, Any]] = {}
    for folder in folders:
        df = pd.read_parquet(folder / "results.parquet")
        meta = json.loads((folder / "provenance.json").read_text())
        table = classes(df)
        for _, r in table[table["spread_from"] == "this run"].iterrows():
            if r["precision"] not in best or r["spread"] > best[r["precision"]]["spread"]:
                best[r["precision"]] = {"spread": float(r["spread"]), "matrix": meta.get("matrix", folder.name),
                                        "run_id": str(meta.get("run_id", "")), "class": r["quality_class"],
                                        "shares": r["shares"], "members": int(r["trained"])}
    return dict(sorted(best.items()))


if __name__ == "__main__":
    found = measure_evidence([Path(p) for p in sys.argv[1:]])
    SPREAD_EVIDENCE.write_text(json.dumps(found, indent=2) + "\n")
    print(f"wrote {SPREAD_EVIDENCE}: " + ", ".join(f"{k} {v['spread']:.3g} ({v['matrix']})" for k, v in found.items()))
