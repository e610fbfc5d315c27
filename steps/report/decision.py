"""A decision per goal: which cell to choose, by how much, and which cells are tied with it.

A goal is one question (`goals:` in the matrix, else `DEFAULT_GOALS`): an objective to minimise
or maximise over the cells that meet its constraints. A cell is excluded, with the reason, when it
did not finish, did not learn, breaks a constraint or has no value of the objective. Among the
rest, the best value is the choice; every cell whose interval overlaps the choice's is tied with
it (a tie is an answer: the data cannot tell them apart). An interval is the noise this run can
measure, never less than a stated minimum effect:

- validation loss: the spread of the cells of one equivalence class, which must end equal (this
  run's, else the saved twins' at the cell's precision), at least `MIN_LOSS_EFFECT` of the value;
- accuracy: the binomial 95% interval over the cell's validation examples;
- speed, time, cost and memory: the relative spread of cells of the same shape in this run (cells
  that differ only in learning rate or seeds step alike), at least `MIN_SPEED_EFFECT`.

`decision.json` in the run folder is the contract other tools read (`decide`'s records); the
report opens with the same decisions as sentences.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from steps.plan.schema import Goal
from steps.report import analysis, economy

DECISION_JSON = "decision.json"
MIN_LOSS_EFFECT = 0.001  # a validation-loss difference under 0.1% of the value is no finding
MIN_SPEED_EFFECT = 0.02  # nor is a speed, time, cost or memory difference under 2%
LEARNED_DROP = 0.05  # a cell learned when its final training loss is 5% or more below its first
# objective -> (what the reader sees, unit, how its noise is measured)
OBJECTIVES: dict[str, tuple[str, str, str]] = {
    "val_loss": ("validation loss", "", "quality"),
    "accuracy": ("accuracy", "%", "accuracy"),
    "time_to_target_s": ("time to the target loss", "s", "speed"),
    "cost_to_target_usd": ("cost to the target loss", "$", "speed"),
    "wall_s": ("wall time", "s", "speed"),
    "cost_usd": ("cost", "$", "speed"),
    "tokens_per_s": ("tokens/s", "", "speed"),
    "tokens_per_usd": ("tokens per dollar", "", "speed"),
    "peak_mem_gb": ("peak memory", "GB", "memory"),
}
# The questions the reference studies ask, where the matrix states none.
DEFAULT_GOALS = [
    Goal(name="best-quality", minimize="val_loss"),
    Goal(name="fastest-to-target", minimize="time_to_target_s"),
    Goal(name="cheapest-to-target", minimize="cost_to_target_usd"),
    Goal(name="throughput-per-dollar", maximize="tokens_per_usd"),
]
# Settings that may tell cells apart in a sentence, in the order they are named.
NAMED = ["model", "peft", "strategy", "instance", "nodes", "world_size", "precision", "micro_batch", "grad_accum",
         "seq_len", "lr"]


def goals_of(meta: dict[str, Any]) -> tuple[list[Goal], bool]:
    """The goals of the run's matrix (provenance's `matrix_spec`), else the default ones; and
    whether they are the default."""
    spec = meta.get("matrix_spec") or {}
    stated = [Goal.model_validate(g) for g in spec.get("goals") or []]
    return (stated, False) if stated else (list(DEFAULT_GOALS), True)


def derive(df: pd.DataFrame) -> pd.DataFrame:
    """Tokens per dollar, which a results table does not hold: throughput over the cell's cost per
    second (cost over wall time, both its full run's)."""
    df = df.copy()
    rate = df["cost_usd"] / df["wall_s"]  # dollars per second of the cell
    return df.assign(tokens_per_usd=np.where(rate > 0, df["tokens_per_s"] / rate, np.nan))


def _curve(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str) and value:
        return json.loads(value)
    return value if isinstance(value, list) else []


def chance(row: Any) -> float | None:
    """The accuracy of guessing, where the task defines it: one over its labels (classification),
    one half for the built-in majority task."""
    task = row.get("data.task")
    if task == "classification":
        labels = row.get("data.labels")
        labels = json.loads(labels) if isinstance(labels, str) and labels.startswith("[") else labels
        return 1.0 / len(labels) if isinstance(labels, (list, tuple)) and labels else None
    return 0.5 if task == "synthetic" else None


def not_learned(row: Any) -> str | None:
    """Why a finished cell did not learn: its training loss did not fall clearly below its first,
    or its accuracy is no better than chance; None where it learned (or cannot be told)."""
    curve = [p["loss"] for p in _curve(row.get("loss_curve")) if p.get("loss") is not None]
    if len(curve) >= 2:
        tail = curve[-max(1, len(curve) // 10):]
        final = float(np.mean(tail))
        if not final <= curve[0] * (1 - LEARNED_DROP):
            return f"did not learn: training loss {final:.4g} against {curve[0]:.4g} at its first step"
    guess, acc = chance(row), row.get("accuracy")
    if guess is not None and acc is not None and not pd.isna(acc) and acc <= guess:
        return f"did not learn: accuracy {acc:.1%}, no better than chance ({guess:.0%})"
    return None


def exclusion(row: Any, goal: Goal) -> str | None:
    """Why a cell cannot answer the goal, or None."""
    if row["outcome"] != "ok":
        why = row.get("error")
        return f"{row['outcome']}" + (f": {str(why).splitlines()[0][:120]}" if isinstance(why, str) and why else "")
    reason = not_learned(row)
    if reason:
        return reason
    checks = [("max_mem_gb", "peak_mem_gb", "GB of peak memory", 1), ("max_cost_usd", "cost_usd", "$ of cost", 1),
              ("max_wall_s", "wall_s", "s of wall time", 1), ("max_val_loss", "val_loss", "validation loss", 1),
              ("min_accuracy", "accuracy", "accuracy", -1)]
    for key, col, what, sign in checks:
        bound = getattr(goal, key)
        value = row.get(col)
        if bound is None:
            continue
        if value is None or pd.isna(value):
            return f"no {what} to check against {key} {bound:g}"
        if sign * (value - bound) > 0:
            return f"{value:.4g} {what}, over {key} {bound:g}" if sign > 0 else \
                f"{value:.4g} {what}, under {key} {bound:g}"
    value = row.get(goal.objective)
    if value is None or pd.isna(value):
        return f"no {OBJECTIVES[goal.objective][0]}" + (
            " (it did not reach the target loss)" if goal.objective.endswith("_to_target_s")
            or goal.objective.endswith("to_target_usd") else "")
    return None


def speed_noise(df: pd.DataFrame, column: str) -> tuple[float, str]:
    """The relative spread of a speed-like column between finished cells of the same shape (every
    setting but learning rate and seeds): noise, since the shape sets the step. At least
    MIN_SPEED_EFFECT."""
    from steps.estimate import calibrate

    groups: dict[str, list[float]] = {}
    for cell, row in calibrate.measured(df):
        value = row.get(column)
        if value is not None and not pd.isna(value) and value > 0:
            groups.setdefault(calibrate.shape(cell), []).append(float(value))
    spreads = [(max(v) - min(v)) / float(np.mean(v)) for v in groups.values() if len(v) >= 2]
    if spreads and max(spreads) > MIN_SPEED_EFFECT:
        return max(spreads), f"±{max(spreads):.1%}: the largest spread of same-shape cells in this run " \
                             f"({len(spreads)} group(s))"
    measured = f" (same-shape cells in this run: at most {max(spreads):.1%})" if spreads else ""
    return MIN_SPEED_EFFECT, f"±{MIN_SPEED_EFFECT:.0%}: the minimum effect{measured}"


def loss_noise(df: pd.DataFrame) -> tuple[dict[str, float], str]:
    """The spread of validation loss per precision: this run's equivalence classes where two or
    more members trained to the end, else the saved twins' largest."""
    table = economy.classes(df)
    own: dict[str, float] = {}
    if not table.empty:
        for _, r in table[table["spread_from"] == "this run"].iterrows():
            own[r["precision"]] = max(own.get(r["precision"], 0.0), float(r["spread"]))
    twins = {p: e["spread"] for p, e in economy.evidence().items()}
    spread = {**twins, **own}
    source = "this run's equivalence classes" if own else "the saved twins' equivalence classes"
    return spread, source


def _half_width(row: Any, objective: str, noise: dict[str, Any]) -> float:
    value = float(row[objective])
    kind = OBJECTIVES[objective][2]
    if kind == "quality":
        spread = noise["loss"].get(row.get("precision"), 0.0)
        return max(spread, MIN_LOSS_EFFECT * abs(value))
    if kind == "accuracy":
        n = row.get("val_examples")
        if n is None or pd.isna(n) or n <= 0:
            return 0.0
        return max(1.96 * math.sqrt(value * (1 - value) / float(n)), 1.0 / float(n))  # one example at least
    return noise[objective][0] * abs(value)


def describe(row: Any, varying: list[str]) -> str:
    """The cell by the settings that differ among the cells compared (all of NAMED where none do)."""
    keys = varying or ["model", "peft", "strategy", "world_size"]
    parts = []
    for k in keys:
        v = row.get(k)
        if k == "world_size":
            parts.append(f"x{int(v)}")
        elif k == "lr":
            parts.append(f"lr {v:g}")
        elif k in ("micro_batch", "grad_accum", "seq_len", "nodes"):
            parts.append(f"{k.replace('_', '-')} {int(v)}")
        elif k.startswith(("train.", "data.")):
            parts.append(f"{k.split('.')[-1].replace('_', ' ')} {v}")
        else:
            parts.append(str(v))
    return " ".join(parts)


def _varying(df: pd.DataFrame) -> list[str]:
    swept = [c for c in df.columns if c.startswith(("train.", "data.")) and df[c].astype(str).nunique() > 1
             and c not in ("train.seed",)]
    return [c for c in NAMED if c in df and df[c].astype(str).nunique() > 1] + swept


def decide(df: pd.DataFrame, goals: list[Goal], default: bool = False) -> list[dict[str, Any]]:
    """One record per goal (`decision.json`), and per model where the run has several (a decision
    chooses how to fine-tune one model; times to a target loss do not compare across models): the
    choice and its value with an interval, the runner-up and the margin with its interval, the
    cells tied with the choice, the excluded cells with their reasons, and the noise used."""
    df = derive(df).reset_index(drop=True)
    loss_spread, loss_source = loss_noise(df) if len(df) else ({}, "")
    models = list(dict.fromkeys(df["model"].astype(str))) if len(df) else []
    out = []
    for goal in goals:
        to = goal.objective in ("time_to_target_s", "cost_to_target_usd")
        frame, targets = to_target(df, goal.target_loss) if to else (df, {})
        for model in (models if len(models) > 1 else [None]):
            cells = frame if model is None else frame[frame["model"].astype(str) == model]
            out.append(_decide_one(cells, goal, default, model, (loss_spread, loss_source),
                                   {m: t for m, t in targets.items() if model is None or m == model}))
    return out


def _decide_one(frame: pd.DataFrame, goal: Goal, default: bool, model: str | None,
                loss: tuple[dict[str, float], str], targets: dict[str, float]) -> dict[str, Any]:
    objective, sign = goal.objective, (1 if goal.minimize else -1)
    kind = OBJECTIVES[objective][2]
    excluded = {r["cell_id"]: why for _, r in frame.iterrows() if (why := exclusion(r, goal))}
    live = frame[~frame["cell_id"].isin(excluded)]
    noise: dict[str, Any] = {"loss": loss[0]}
    if kind in ("speed", "memory"):
        noise[objective] = speed_noise(frame, "peak_mem_gb" if kind == "memory" else "tokens_per_s")
    how = {"quality": f"the validation-loss spread of {loss[1]} at the cell's precision, at least "
                      f"{MIN_LOSS_EFFECT:.1%} of the value",
           "accuracy": "the binomial 95% interval over the cell's validation examples"}.get(
        kind, noise.get(objective, (0, ""))[1])
    record: dict[str, Any] = {"name": goal.name, **({"model": model} if model is not None else {}),
                              "objective": objective, "direction": "minimize" if goal.minimize else "maximize",
                              "constraints": goal.constraints(), "default": default, "choice": None,
                              "value": None, "interval": None, "runner_up": None, "margin": None,
                              "margin_interval": None, "tied_with": [], "excluded": excluded,
                              "noise": how, "candidates": int(len(live)),
                              **({"target_loss": targets} if targets else {})}
    if len(live):
        ranked = live.assign(_key=sign * live[objective]).sort_values("_key", kind="stable")
        best = ranked.iloc[0]
        h_best = _half_width(best, objective, noise)
        tied = [r["cell_id"] for _, r in ranked.iloc[1:].iterrows()
                if abs(r[objective] - best[objective]) <= h_best + _half_width(r, objective, noise)]
        record.update(choice=best["cell_id"], value=float(best[objective]),
                      interval=[float(best[objective] - h_best), float(best[objective] + h_best)], tied_with=tied)
        if len(ranked) > 1:
            second = ranked.iloc[1]
            margin = float(sign * (second[objective] - best[objective]))  # how much better the choice is
            width = h_best + _half_width(second, objective, noise)
            record.update(runner_up=second["cell_id"], margin=margin, margin_interval=[margin - width, margin + width])
    return record


def to_target(df: pd.DataFrame, target: float | None) -> tuple[pd.DataFrame, dict[str, float]]:
    """Time and cost to a target loss, worked out as the report's goodput section does it (the
    smoothed training loss first at or under it; a speed cell: its class's steps at its own step
    time): to `target` where the goal names one, else to the run's (`train.target_loss`, or the
    median of the finished cells' final losses, per model). Also the target used, per model."""
    frame = df.assign(target_loss=target, time_to_target_s=np.nan) if target is not None else df
    table = analysis.goodput(frame)
    if table.empty:
        return df.assign(time_to_target_s=np.nan, cost_to_target_usd=np.nan), {}
    times = dict(zip(table["cell_id"], table["time_to_target_s"]))
    targets = {str(m): float(t) for m, t in table.groupby("model")["target_loss"].first().items() if pd.notna(t)}
    df = df.assign(time_to_target_s=[times.get(c, np.nan) for c in df["cell_id"]])
    return df.assign(cost_to_target_usd=df["time_to_target_s"] * df["cost_usd"] / df["wall_s"]), targets


def _fmt(value: float, objective: str) -> str:
    unit = OBJECTIVES[objective][1]
    if unit == "%":
        return f"{value:.1%}"
    if unit == "$":  # never in e-notation: $0.0000929
        return "$" + np.format_float_positional(value, precision=3, unique=False, fractional=False, trim="-")
    if unit in ("s", "GB"):
        return f"{value:,.3g} {unit}" if abs(value) < 1000 else f"{value:,.0f} {unit}"
    return f"{value:.5g}" if abs(value) < 1000 else f"{value:,.0f}"


def sentences(records: list[dict[str, Any]], df: pd.DataFrame) -> list[str]:
    """What a person reads: per goal, the choice by the settings that differ, its value, the cells
    tied with it, the runner-up and the margin, and why the others lost."""
    rows = {r["cell_id"]: r for _, r in df.iterrows()}
    out = []
    for rec in records:
        objective = rec["objective"]
        label = OBJECTIVES[objective][0]
        model = rec.get("model")
        varying = _varying(df if model is None else df[df["model"].astype(str) == model])
        head = f"**{rec['name']}**" + (f" for {model}" if model else "") + f" ({rec['direction']} {label}" + (
            ", " + ", ".join(f"{k} {v:g}" for k, v in rec["constraints"].items()) if rec["constraints"] else "") + ")"
        reasons = _reasons(rec["excluded"])
        if rec["choice"] is None:
            out.append(f"{head}: no cell qualifies. " + (f"Excluded: {reasons}." if reasons else "No cell ran."))
            continue
        lo, hi = rec["interval"]
        text = (f"{head}: {describe(rows[rec['choice']], varying)}, {label} {_fmt(rec['value'], objective)} "
                f"(interval {_fmt(lo, objective)} to {_fmt(hi, objective)})")
        if rec["tied_with"]:
            names = "; ".join(describe(rows[c], varying) for c in rec["tied_with"][:4])
            more = f" and {len(rec['tied_with']) - 4} more" if len(rec["tied_with"]) > 4 else ""
            text += f". Tied within the noise with {names}{more}: the data cannot tell them apart"
        elif rec["runner_up"] is not None:
            m, (mlo, mhi) = rec["margin"], rec["margin_interval"]
            text += (f". Ahead of {describe(rows[rec['runner_up']], varying)} by {_fmt(abs(m), objective)} "
                     f"(interval {_fmt(abs(mlo), objective)} to {_fmt(abs(mhi), objective)})")
        text += "." + (f" Excluded: {reasons}." if reasons else "")
        out.append(text)
    return out


def _reasons(excluded: dict[str, str]) -> str:
    """The exclusions counted by kind ('2 did not learn, 1 oom')."""
    kinds: dict[str, int] = {}
    for why in excluded.values():
        kind = why.split(":")[0] if not why[:1].isdigit() else "broke a constraint"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


def write(records: list[dict[str, Any]], out_dir: Path) -> Path:
    path = Path(out_dir) / DECISION_JSON
    path.write_text(json.dumps({"goals": records}, indent=2, default=float))
    return path


def section(records: list[dict[str, Any]], df: pd.DataFrame, default: bool) -> str:
    """The report's opening section: one paragraph per goal, and how a difference is judged."""
    lead = ("No `goals:` in the matrix: the default goals answer the reference studies' questions."
            if default else "The matrix's goals.")
    body = "\n".join(f"- {s}" for s in sentences(records, df))
    judged = ("A difference counts only where the two cells' intervals do not overlap; an interval is the "
              "noise this run measures (validation loss: the spread of cells that must end equal; accuracy: "
              "the binomial interval of its validation examples; speed, time, cost and memory: the spread of "
              f"cells of one shape), never less than {MIN_LOSS_EFFECT:.1%} of a loss or {MIN_SPEED_EFFECT:.0%} of a "
              "speed. Cells that did not finish, did not learn or break a constraint are excluded, with the "
              f"reason in `{DECISION_JSON}`.")
    return f"## Decision\n\n{lead}\n\n{body}\n\n{judged}"
