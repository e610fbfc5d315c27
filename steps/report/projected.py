"""At full scale, predicted: the decision this run's goals would reach on the full-scale matrix
that the run's `report.project_to` names, from the planner alone (no torch, no GPU, no network).

A CPU twin answers its questions on tiny models; this answers "what would this choose at full
scale" before anything runs there. Each cell of the named matrix is planned as `python -m
steps.plan` plans it (the models' shapes from their presets, the store's calibration, no probe:
the full-scale devices are not this machine), and the goals the plan can answer (memory, tokens/s,
wall time, cost, tokens per dollar) are decided among the cells predicted to fit, with the plan's
intervals standing in for the run's noise. Cells that differ only in learning rate or seeds plan
alike and count as one configuration. Goals on the loss or accuracy cannot be predicted, and say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from steps.estimate import calibrate, cost, matrix_plan, memory
from steps.estimate.planner import CellPlan, gb
from steps.plan.matrix import expand, load_matrix, project_path
from steps.plan.schema import CellSpec, ConfigError, Goal, MatrixSpec, PlannedCell
from steps.plan.settings import RUN_LIMITS, flatten
from steps.report import decision

TITLE = "At full scale (predicted)"
# What each objective the plan cannot predict would need.
CANNOT = {
    "val_loss": "the plan predicts memory, speed, time and cost, not the loss a cell reaches: only training "
                "the full-scale matrix answers it",
    "accuracy": "the plan predicts memory, speed, time and cost, not the accuracy a cell reaches: only training "
                "the full-scale matrix answers it",
    "time_to_target_s": "the time to a target loss needs the loss curve, which only training gives (the plan "
                        "predicts the time of the whole run: goal `wall_s`)",
    "cost_to_target_usd": "the cost to a target loss needs the loss curve, which only training gives (the plan "
                          "predicts the cost of the whole run: goal `cost_usd`)",
}
UNCHECKED = ("max_val_loss", "min_accuracy")  # constraints on quality: the plan cannot check them
MEMORY_SPREAD = 1 - memory.TIGHT  # ±10%: the margin under which the plan calls a cell tight
NOT_CONFIGURATION = {"cell_id", "matrix", "track", "track_context", "lr", "repeat"}  # with the seeds
SEEDS = ("train.seed", "data.seed")


@dataclass(frozen=True)
class Configuration:
    """Cells of the planned matrix that differ only in learning rate and seeds: one plan."""

    cells: list[str]
    cell: CellSpec
    plan: CellPlan | None
    refused: str | None
    lrs: int  # distinct learning rates among its cells

    @property
    def cell_id(self) -> str:
        return self.cells[0]


def configurations(planned: list[PlannedCell], plans: dict[str, CellPlan]) -> list[Configuration]:
    """The planned cells grouped by everything but learning rate and seeds (the planner reads
    neither), in the matrix's order; a group is refused where its first cell is."""
    groups: dict[str, list[PlannedCell]] = {}
    for p in planned:
        body = p.cell.model_dump(mode="json", exclude=NOT_CONFIGURATION)
        for section, key in (path.split(".") for path in SEEDS):
            body[section].pop(key, None)
        groups.setdefault(json.dumps(body, sort_keys=True), []).append(p)
    return [Configuration([p.cell.cell_id for p in ps], ps[0].cell, plans.get(ps[0].cell.cell_id), ps[0].refused,
                          len({p.cell.lr for p in ps})) for ps in groups.values()]


def plan(spec: MatrixSpec) -> tuple[list[PlannedCell], matrix_plan.MatrixPlan, list[str]]:
    """The matrix planned as `python -m steps.plan --check never --no-probe` plans it, the store's
    calibration applied; and the problems for which the plan would refuse the whole matrix
    (a budget), which do not stop the projection."""
    from steps.estimate import store

    planned = expand(spec)
    fitted = store.calibration()

    def predict_cell(cell: CellSpec) -> CellPlan:
        return calibrate.predict(cell, fitted, cost.Pricing.of(spec), {}, fixes=True)

    planned_plan = matrix_plan.plan_matrix(planned, {}, cost.Pricing.of(spec), predict_cell)
    try:
        planned, planned_plan = matrix_plan.apply_settings(spec, planned, planned_plan)
    except ConfigError as exc:
        return planned, planned_plan, exc.problems
    return planned, planned_plan, []


def predicted(c: Configuration, objective: str, compute: cost.Compute) -> tuple[float, tuple[float, float]] | None:
    """The plan's value of an objective for a configuration and its interval; None where the plan
    has none. Tokens per dollar: tokens/s over the instance's price per second (exact: the interval
    is the tokens/s one); peak memory: as a run measures it, ±`MEMORY_SPREAD`."""
    p = c.plan
    if p is None:
        return None
    if objective == "peak_mem_gb":
        value = calibrate._comparable_memory(c.cell, p, {})  # what the results table's peak_mem_gb would say
        return None if value is None else (value, (value * (1 - MEMORY_SPREAD), value * (1 + MEMORY_SPREAD)))
    if objective == "tokens_per_usd":
        hourly = cost.hourly_usd(c.cell, compute)
        if not hourly or p.tokens_per_s is None or p.tokens_per_s_range is None:
            return None
        per_usd = 3600 / hourly
        lo, hi = p.tokens_per_s_range
        return p.tokens_per_s * per_usd, (lo * per_usd, hi * per_usd)
    value, span = getattr(p, objective), getattr(p, f"{objective}_range")
    if value is None or span is None:
        return None
    return float(value), (float(span[0]), float(span[1]))


def exclusion(c: Configuration, goal: Goal, compute: cost.Compute) -> str | None:
    """Why a configuration cannot answer the goal at full scale, or None: predicted not to fit,
    refused before launch, no prediction, a constraint broken, or no predicted value."""
    p = c.plan
    if p is not None and p.verdict == "will not fit":
        return p.reason()
    if c.refused:
        return f"refused: {c.refused}"
    if p is None or p.peak_gb is None:
        return f"no prediction: {(p.note if p is not None else None) or 'the plan has none'}"
    if p.verdict == "?":
        return f"no prediction: the memory of a {c.cell.instance} device is not known"
    for key, objective, what in (("max_mem_gb", "peak_mem_gb", "GB of peak memory"),
                                 ("max_cost_usd", "cost_usd", "$ of cost"), ("max_wall_s", "wall_s", "s of wall time")):
        bound = getattr(goal, key)
        if bound is None:
            continue
        found = predicted(c, objective, compute)
        if found is None:
            return f"no predicted {decision.OBJECTIVES[objective][0]} to check against {key} {bound:g}"
        if found[0] > bound:
            return f"{found[0]:.4g} {what} predicted, over {key} {bound:g}"
    if predicted(c, goal.objective, compute) is None:
        return f"no predicted {decision.OBJECTIVES[goal.objective][0]}: " + _missing(c, goal.objective, compute)


def _missing(c: Configuration, objective: str, compute: cost.Compute) -> str:
    """Why the plan has no value of the objective for a configuration that it planned."""
    if objective in ("wall_s", "cost_usd") and c.plan is not None and c.plan.steps is None:
        return ("`train.epochs` without `data.train_samples`: its steps are not known until the data is read; "
                "set data.train_samples to plan them")
    if objective in ("cost_usd", "tokens_per_usd") and cost.hourly_usd(c.cell, compute) is None:
        return f"no price for {c.cell.instance} in configs/instances.yaml"
    return (c.plan.note if c.plan is not None else None) or "the plan has no step time"


def noise(objective: str) -> str:
    """How the interval of a predicted objective is set (`decision.json`'s `noise`)."""
    if objective == "peak_mem_gb":
        return (f"the plan's memory ±{MEMORY_SPREAD:.0%} (the margin under which it calls a cell tight), not a "
                "measured spread")
    return ("the plan's interval: the calibration's error on runs it did not see where a calibration covers the "
            f"cell, else x/÷ {math.exp(calibrate.UNCOVERED['catalog']):.0f} from the catalog's peak; not a measured "
            "spread")


def decide(configs: list[Configuration], goals: list[Goal], default: bool,
           compute: cost.Compute) -> list[dict[str, Any]]:
    """`decision.decide`'s records, predicted: per goal (and per model where the matrix has several)
    the choice among the configurations predicted to fit, its value and interval, the runner-up and
    margin, the configurations tied within the intervals, the excluded cells with their reasons. A
    goal the plan cannot answer has no choice, and `cannot_predict` says why."""
    models = list(dict.fromkeys(c.cell.model for c in configs))
    out = []
    for goal in goals:
        if goal.objective in CANNOT:
            out.append({**_record(goal, default, None), "cannot_predict": CANNOT[goal.objective],
                        "candidates": 0})
            continue
        for model in (models if len(models) > 1 else [None]):
            mine = [c for c in configs if model is None or c.cell.model == model]
            out.append(_decide_one(mine, goal, default, model, compute))
    return out


def _record(goal: Goal, default: bool, model: str | None) -> dict[str, Any]:
    """The fields every predicted record has, as `decision.decide` names them."""
    unchecked = [k for k in UNCHECKED if getattr(goal, k) is not None]
    return {**decision.heading(goal, default, model), "predicted": True, "choice": None, "choice_cells": [],
            "value": None, "interval": None,
            "runner_up": None, "margin": None, "margin_interval": None, "tied_with": [], "excluded": {},
            "noise": noise(goal.objective) if goal.objective not in CANNOT else "",
            "unchecked": unchecked, "cannot_predict": None}


def _decide_one(configs: list[Configuration], goal: Goal, default: bool, model: str | None,
                compute: cost.Compute) -> dict[str, Any]:
    record = _record(goal, default, model)
    excluded: dict[str, str] = {}
    live = []
    for c in configs:
        why = exclusion(c, goal, compute)
        if why:
            excluded.update(dict.fromkeys(c.cells, why))
        else:
            live.append((c, *predicted(c, goal.objective, compute)))
    sign = 1 if goal.minimize else -1
    ranked = sorted(live, key=lambda t: sign * t[1])  # stable: the matrix's order among equals
    record.update(excluded=excluded, candidates=len(ranked))
    if not ranked:
        return record
    best, value, (lo, hi) = ranked[0]
    tied = [c.cell_id for c, _, (olo, ohi) in ranked[1:] if olo <= hi and ohi >= lo]
    record.update(choice=best.cell_id, choice_cells=best.cells, value=value, interval=[lo, hi], tied_with=tied)
    if len(ranked) > 1:
        second, other, (slo, shi) = ranked[1]
        margin = sign * (other - value)
        low, high = (slo - hi, shi - lo) if sign > 0 else (lo - shi, hi - slo)
        record.update(runner_up=second.cell_id, margin=margin, margin_interval=[low, high])
    return record


@dataclass(frozen=True)
class Projection:
    """The full-scale matrix planned, and the goals decided on its plan."""

    matrix: str  # as `report.project_to` names it
    spec: MatrixSpec | None = None
    configs: list[Configuration] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    cells: int = 0
    problems: list[str] = field(default_factory=list)  # why the plan would refuse the whole matrix
    error: str | None = None  # why it could not be planned

    def to_json(self) -> dict[str, Any]:
        """`decision.json`'s `projected`: the matrix, its goals as `decision.decide`'s records (each
        `predicted`), and its cells predicted not to fit or refused, with the reasons."""
        if self.error:
            return {"matrix": self.matrix, "predicted": True, "error": self.error, "goals": []}
        not_fit = {cid: c.plan.reason() for c in self.configs if _oom(c) for cid in c.cells}
        refused = {cid: c.refused for c in self.configs if c.refused and not _oom(c) for cid in c.cells}
        return {"matrix": self.matrix, "name": self.spec.name, "predicted": True, "cells": self.cells,
                "configurations": len(self.configs), "goals": self.records, "not_fit": not_fit, "refused": refused,
                "problems": self.problems}


def _oom(c: Configuration) -> bool:
    return c.plan is not None and c.plan.verdict == "will not fit"


def project(meta: dict[str, Any]) -> Projection | None:
    """The full-scale matrix the run's `report.project_to` names (provenance's `matrix_spec`),
    planned, and the run's goals decided on its plan; None where the run names none."""
    path = ((meta.get("matrix_spec") or {}).get("report") or {}).get("project_to")
    if not path:
        return None
    try:
        spec = load_matrix(project_path(path))
    except (OSError, ConfigError) as exc:
        return Projection(path, error=str(exc))
    planned, planned_plan, problems = plan(spec)
    configs = configurations(planned, planned_plan.plans)
    goals, default = decision.goals_of(meta)
    decided = decide(configs, goals, default, cost.Pricing.of(spec))
    return Projection(path, spec, configs, decided, len(planned), problems)


# ---------------------------------------------------------------- the report's section

def _row(c: Configuration) -> dict[str, Any]:
    """A configuration as `decision.describe` reads a results row."""
    cell = c.cell
    return {"model": cell.model, "peft": cell.peft, "strategy": cell.strategy, "instance": cell.instance,
            "nodes": cell.nodes, "world_size": cell.world_size, "precision": cell.precision,
            "micro_batch": cell.micro_batch, "grad_accum": cell.grad_accum, "seq_len": cell.seq_len,
            **flatten(cell)}


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    """The settings that tell the configurations apart (never lr or seeds: a configuration
    holds every learning rate of its cells)."""
    settings = [k for k in (rows[0] if rows else {}) if k.startswith(("train.", "data."))
                and k not in SEEDS and k not in RUN_LIMITS]
    keys = [k for k in decision.NAMED if k != "lr"] + settings
    differ = [k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in rows}) > 1]
    return [k for k in keys if k in differ or k in ("peft", "strategy")]  # a name is never just "x8"


def _fmt(value: float, objective: str) -> str:
    """`decision`'s format, a count to 3 significant figures: a prediction has no more."""
    if decision.OBJECTIVES[objective][1] or abs(value) < 1000:
        return decision.fmt(value, objective)
    return f"{round(value, 2 - int(math.floor(math.log10(abs(value))))):,.0f}"


def _name(c: Configuration, varying: list[str]) -> str:
    text = decision.describe(_row(c), varying)
    return text + (f" (its {c.lrs} learning rates alike)" if c.lrs > 1 else "")


def sentences(projection: Projection) -> list[str]:
    """Per goal: the predicted choice by the settings that differ, its value and the plan's interval,
    the configurations tied with it or the runner-up and margin, and why the others are out
    (counted by configuration); or why the plan cannot answer the goal."""
    by_id = {c.cell_id: c for c in projection.configs}
    fmt = _fmt
    out = []
    for rec in projection.records:
        objective = rec["objective"]
        label = decision.OBJECTIVES[objective][0]
        model = rec.get("model")
        head = decision.title(rec)
        if rec["cannot_predict"]:
            out.append(f"{head}: cannot be predicted: {rec['cannot_predict']}.")
            continue
        varying = _varying([_row(c) for c in projection.configs if model is None or c.cell.model == model])
        reasons = decision.count_reasons({c: why for c, why in rec["excluded"].items() if c in by_id})
        unchecked = (f" Not checked: {', '.join(rec['unchecked'])} (the plan predicts no loss or accuracy)."
                     if rec["unchecked"] else "")
        if rec["choice"] is None:
            out.append(f"{head}: no configuration is predicted to qualify. Excluded: {reasons or 'none'}.{unchecked}")
            continue
        best = by_id[rec["choice"]]
        lo, hi = rec["interval"]
        tight = (f"; tight: {gb(best.plan.peak_gb)} of {gb(best.plan.device_gb)} GB per rank"
                 if best.plan is not None and best.plan.verdict == "tight" else "")
        text = (f"{head}: predicted {_name(best, varying)}, {label} {fmt(rec['value'], objective)} (the plan's "
                f"interval {fmt(lo, objective)} to {fmt(hi, objective)}{tight})")
        if rec["runner_up"] is not None:  # beside a tie too: how far apart the plan puts them
            m, (mlo, mhi) = rec["margin"], rec["margin_interval"]
            text += (f"; ahead of the runner-up, {_name(by_id[rec['runner_up']], varying)}, by {fmt(m, objective)} "
                     f"(interval {fmt(mlo, objective)} to {fmt(mhi, objective)})")
        if rec["tied_with"]:
            names = "; ".join(_name(by_id[c], varying) for c in rec["tied_with"][:4])
            more = f" and {len(rec['tied_with']) - 4} more" if len(rec["tied_with"]) > 4 else ""
            text += f". Tied within the plan's intervals with {names}{more}: the plan cannot tell them apart"
        out.append(text + "." + (f" Excluded: {reasons}." if reasons else "") + unchecked)
    return out


def _basis(configs: list[Configuration]) -> str:
    """Where the predicted times come from, in one sentence."""
    timed = [c for c in configs if c.plan is not None and c.plan.step_s is not None]
    calibrated = sum(bool(c.plan.calibration) for c in timed)
    devices = sorted({calibrate.device_model(c.cell) for c in timed if not c.plan.calibration})
    parts = [f"{calibrated} calibrated on measured runs"] if calibrated else []
    if len(timed) > calibrated:
        parts.append(f"{len(timed) - calibrated} from first principles, the catalog's peak FLOPs (no calibration "
                     f"covers {', '.join(devices)}: x/÷ {math.exp(calibrate.UNCOVERED['catalog']):.0f})")
    return f"Times of the {len(timed)} configurations with a step time: {' and '.join(parts)}." if timed else ""


def _unknown_steps(configs: list[Configuration]) -> str:
    n = sum(1 for c in configs if c.plan is not None and c.plan.step_s is not None and c.plan.steps is None)
    return (f" No wall time or cost for {n} configuration(s): `train.epochs` without `data.train_samples` leaves "
            "their steps unknown until the data is read (tokens/s and tokens per dollar do not need them)."
            if n else "")


def section(projection: Projection) -> str:
    """The report's section after the decision: the goals decided on the full-scale plan, the
    configurations predicted not to fit, and what the intervals are; all labelled predictions."""
    path = projection.matrix
    if projection.error or projection.spec is None:
        return (f"## {TITLE}\n\n`report.project_to` names `{path}`, which cannot be planned here:\n\n"
                f"```\n{projection.error}\n```")
    configs = projection.configs
    instances = ", ".join(dict.fromkeys(c.cell.instance for c in configs))
    lead = (f"_Predicted by the plan, not measured._ What this run's goals would choose among the cells of "
            f"`{path}` ({projection.spec.name}: {projection.cells} cells, {len(configs)} configurations once "
            f"learning rates and seeds are set aside, on {instances}), as `python -m steps.plan {path}` plans them: "
            f"memory per rank, tokens/s, wall time and cost, each with the plan's interval. Only configurations "
            f"predicted to fit are chosen from; a tie means the plan cannot tell them apart, and a GPU run decides.")
    parts = [f"## {TITLE}", lead, "\n".join(f"- {s}" for s in sentences(projection))]
    varying = _varying([_row(c) for c in configs])
    oom = [c for c in configs if _oom(c)]
    if oom:
        lines = [f"- {_name(c, varying)}: {gb(c.plan.peak_gb)} GB per rank > {gb(c.plan.device_gb)} GB"
                 + (f"; fits with {c.plan.fix}" if c.plan.fix else "; no change of batch, checkpointing or "
                    "sharding found that fits") for c in oom]
        cells = sum(len(c.cells) for c in oom)
        parts.append(f"Predicted not to fit ({len(oom)} of {len(configs)} configurations, {cells} "
                     f"cell{'s' * (cells != 1)}):\n\n" + "\n".join(lines))
    other = [c for c in configs if c.refused and not _oom(c)]
    if other:
        parts.append("Refused before launch by the plan:\n\n"
                     + "\n".join(f"- {_name(c, varying)}: {c.refused}" for c in other))
    if projection.problems:
        parts.append("The plan refuses the whole matrix as it stands:\n\n"
                     + "\n".join(f"- {p}" for p in projection.problems))
    parts.append(f"{_basis(configs)}{_unknown_steps(configs)} Peak memory: the plan's, ±{MEMORY_SPREAD:.0%}. "
                 f"Every cell with every column: `python -m steps.plan {path}`.")
    return "\n\n".join(parts)
