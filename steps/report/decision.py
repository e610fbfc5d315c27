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
from scipy import stats

from steps.plan.schema import Goal
from steps.report import analysis, economy
from steps.report.analysis import not_learned

DECISION_JSON = "decision.json"
MIN_LOSS_EFFECT = 0.001  # a validation-loss difference under 0.1% of the value is no finding
MIN_SPEED_EFFECT = 0.02  # nor is a speed, time, cost or memory difference under 2%
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


SIGNIFICANCE = 0.05  # with repeats, a difference counts where Welch's t-test gives p under this


def configurations(df: pd.DataFrame) -> pd.Series:
    """Each row's configuration: a label shared by the cells that differ only in their repeat
    (seed), that of its first repeat's cell."""
    from steps.results.table import AXES

    keys = [c for c in AXES if c in df] + sorted(
        c for c in df.columns if c.startswith(("train.", "data.")) and c not in analysis.REPEAT_KEYS)
    if not keys or df.empty:
        return df["cell_id"].astype(str)
    text = ["|".join(map(str, row)) for row in df[keys].to_numpy(dtype=object)]
    first = dict(zip(text[::-1], df["cell_id"].astype(str)[::-1]))  # the first row of each
    return pd.Series([first[t] for t in text], index=df.index)


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


def exclusion(row: Any, goal: Goal) -> str | None:
    """Why a cell cannot answer the goal, or None."""
    if row["outcome"] != "ok":
        why = row.get("error")
        return f"{row['outcome']}" + (f": {str(why).splitlines()[0][:120]}" if isinstance(why, str) and why else "")
    reason = not_learned(row)  # from the row itself, not a `learned` column an edit may have left stale
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
             and c not in analysis.REPEAT_KEYS]
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


def heading(goal: Goal, default: bool, model: str | None) -> dict[str, Any]:
    """The fields that open every record, measured or predicted (`steps.report.projected`): the
    goal as stated, and the model it was decided for where the run has several."""
    return {"name": goal.name, **({"model": model} if model is not None else {}), "objective": goal.objective,
            "direction": "minimize" if goal.minimize else "maximize", "constraints": goal.constraints(),
            "default": default}


def title(rec: dict[str, Any]) -> str:
    """How a record's sentence opens: '**name** for model (minimize label, constraint value)'."""
    label = OBJECTIVES[rec["objective"]][0]
    constraints = ", ".join(f"{k} {v:g}" for k, v in rec["constraints"].items())
    return (f"**{rec['name']}**" + (f" for {rec['model']}" if rec.get("model") else "")
            + f" ({rec['direction']} {label}" + (f", {constraints}" if constraints else "") + ")")


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
    record: dict[str, Any] = {**heading(goal, default, model), "choice": None,
                              "value": None, "interval": None, "runner_up": None, "margin": None,
                              "margin_interval": None, "tied_with": [], "excluded": excluded,
                              "noise": how, "candidates": int(len(live)),
                              **({"target_loss": targets} if targets else {})}
    config = configurations(frame)
    if len(frame) and config.value_counts().max() > 1:
        return _decide_repeats(frame, config, goal, record, excluded)
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


def _floor(objective: str, mean: float, examples: float) -> float:
    """The minimum effect at this value: a smaller difference is no finding, however steady."""
    kind = OBJECTIVES[objective][2]
    if kind == "quality":
        return MIN_LOSS_EFFECT * abs(mean)
    if kind == "accuracy":
        return 1.0 / examples if examples > 0 else 0.0
    return MIN_SPEED_EFFECT * abs(mean)


def _decide_repeats(frame: pd.DataFrame, config: pd.Series, goal: Goal, record: dict[str, Any],
                    excluded: dict[str, str]) -> dict[str, Any]:
    """With `repeats:`, configurations (not cells) compete on their repeats: each one's mean with
    the 95% interval of the mean (Student's t); a configuration is excluded when any of its
    repeats is; another is tied with the choice unless Welch's t-test says they differ
    (p < SIGNIFICANCE) by more than the minimum effect."""
    objective, sign = goal.objective, (1 if goal.minimize else -1)
    members: dict[str, list[str]] = {}
    for cid, label in zip(frame["cell_id"], config):
        members.setdefault(label, []).append(cid)
    for cells in members.values():
        out = next((c for c in cells if c in excluded), None)
        for c in cells:
            if out is not None and c not in excluded:
                excluded[c] = f"another repeat excluded: {out}"
    values = frame.assign(_config=config.values)
    values = values[~values["cell_id"].isin(excluded)]
    summary = []
    for label, g in values.groupby("_config", sort=False):
        v = g[objective].astype(float).to_numpy()
        n, mean = len(v), float(v.mean())
        sd = float(v.std(ddof=1)) if n > 1 else 0.0
        floor = _floor(objective, mean, float(g["val_examples"].fillna(0).sum()) if "val_examples" in g else 0.0)
        half = float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)) if n > 1 else 0.0
        summary.append({"config": label, "n": n, "mean": mean, "sd": sd, "half": max(half, floor), "floor": floor})
    record.update(candidates=len(summary), excluded=excluded,
                  noise=("the 95% interval of the mean over each configuration's repeats (Student's t); a "
                         f"difference counts where Welch's t-test gives p < {SIGNIFICANCE:g} and it exceeds the "
                         f"minimum effect ({MIN_LOSS_EFFECT:.1%} of a loss, {MIN_SPEED_EFFECT:.0%} of a speed)"))
    if not summary:
        return record
    summary.sort(key=lambda c: sign * c["mean"])
    best = summary[0]
    record.update(choice=best["config"], value=best["mean"], repeats=best["n"],
                  choice_cells=members[best["config"]],
                  interval=[best["mean"] - best["half"], best["mean"] + best["half"]],
                  tied_with=[c["config"] for c in summary[1:] if not _differ(best, c)])
    if len(summary) > 1:
        second = summary[1]
        margin = sign * (second["mean"] - best["mean"])
        width = _welch_half(best, second) or (best["half"] + second["half"])
        record.update(runner_up=second["config"], margin=margin, margin_interval=[margin - width, margin + width])
    return record


def _welch_half(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Half the 95% interval of the difference of two means (Welch); None without two repeats each."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    va, vb = a["sd"] ** 2 / a["n"], b["sd"] ** 2 / b["n"]
    if va + vb == 0:
        return 0.0
    dof = (va + vb) ** 2 / (va**2 / (a["n"] - 1) + vb**2 / (b["n"] - 1))
    return float(stats.t.ppf(0.975, dof) * math.sqrt(va + vb))


def _differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two configurations' means differ: by more than the minimum effect, and (with two
    repeats each) significantly by Welch's t-test; else by intervals that do not overlap."""
    gap = abs(a["mean"] - b["mean"])
    if gap <= max(a["floor"], b["floor"]):
        return False
    if a["n"] >= 2 and b["n"] >= 2:
        if a["sd"] == 0 and b["sd"] == 0:
            return True
        p = stats.ttest_ind_from_stats(a["mean"], a["sd"], a["n"], b["mean"], b["sd"], b["n"], equal_var=False).pvalue
        return bool(p < SIGNIFICANCE)
    return gap > a["half"] + b["half"]


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


def fmt(value: float, objective: str) -> str:
    """A value in its objective's unit, to the precision a decision states."""
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
        head = title(rec)
        reasons = count_reasons(rec["excluded"])
        if rec["choice"] is None:
            out.append(f"{head}: no cell qualifies. " + (f"Excluded: {reasons}." if reasons else "No cell ran."))
            continue
        lo, hi = rec["interval"]
        mean = f"mean of {rec['repeats']} repeats " if rec.get("repeats", 1) > 1 else ""
        text = (f"{head}: {describe(rows[rec['choice']], varying)}, {label} {mean}{fmt(rec['value'], objective)} "
                f"(interval {fmt(lo, objective)} to {fmt(hi, objective)})")
        if rec["tied_with"]:
            names = "; ".join(describe(rows[c], varying) for c in rec["tied_with"][:4])
            more = f" and {len(rec['tied_with']) - 4} more" if len(rec["tied_with"]) > 4 else ""
            text += f". Tied within the noise with {names}{more}: the data cannot tell them apart"
        elif rec["runner_up"] is not None:
            m, (mlo, mhi) = rec["margin"], rec["margin_interval"]
            text += (f". Ahead of {describe(rows[rec['runner_up']], varying)} by {fmt(abs(m), objective)} "
                     f"(interval {fmt(abs(mlo), objective)} to {fmt(abs(mhi), objective)})")
        text += "." + (f" Excluded: {reasons}." if reasons else "")
        out.append(text)
    return out


def count_reasons(excluded: dict[str, str]) -> str:
    """The exclusions counted by kind ('2 did not learn, 1 oom')."""
    kinds: dict[str, int] = {}
    for why in excluded.values():
        kind = why.split(":")[0] if not why[:1].isdigit() else "broke a constraint"
        kinds[kind] = kinds.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


def write(records: list[dict[str, Any]], out_dir: Path, projected: dict[str, Any] | None = None) -> Path:
    """`decision.json`: the goals decided on this run, and `projected`, the same goals predicted at
    full scale (`steps.report.projected`) where the matrix names a `report.project_to`."""
    path = Path(out_dir) / DECISION_JSON
    body = {"goals": records, **({"projected": projected} if projected is not None else {})}
    path.write_text(json.dumps(body, indent=2, default=float))
    return path


def section(records: list[dict[str, Any]], df: pd.DataFrame, default: bool) -> str:
    """The report's opening section: one paragraph per goal, and how a difference is judged."""
    lead = ("No `goals:` in the matrix: the default goals answer the reference studies' questions."
            if default else "The matrix's goals.")
    body = "\n".join(f"- {s}" for s in sentences(records, df))
    if any(r.get("repeats", 1) > 1 for r in records):
        judged = ("Configurations compete on their repeats: each one's value is the mean of its repeats, its "
                  "interval the 95% interval of that mean (Student's t), and two differ only where Welch's t-test "
                  f"gives p < {SIGNIFICANCE:g} and the gap exceeds {MIN_LOSS_EFFECT:.1%} of a loss or "
                  f"{MIN_SPEED_EFFECT:.0%} of a speed. A configuration is excluded when any of its repeats did not "
                  f"finish, did not learn or broke a constraint, with the reason in `{DECISION_JSON}`.")
        return f"## Decision\n\n{lead}\n\n{body}\n\n{judged}"
    judged = ("A difference counts only where the two cells' intervals do not overlap; an interval is the "
              "noise this run measures (validation loss: the spread of cells that must end equal; accuracy: "
              "the binomial interval of its validation examples; speed, time, cost and memory: the spread of "
              f"cells of one shape), never less than {MIN_LOSS_EFFECT:.1%} of a loss or {MIN_SPEED_EFFECT:.0%} of a "
              "speed. Cells that did not finish, did not learn or break a constraint are excluded, with the "
              f"reason in `{DECISION_JSON}`.")
    return f"## Decision\n\n{lead}\n\n{body}\n\n{judged}"
