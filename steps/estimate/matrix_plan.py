"""A whole matrix planned: its cells checked (the models' facts, the pre-launch checks), every
cell predicted, the matrix's `plan:` settings applied (predicted out-of-memory cells skipped,
budgets refused), and the plan's table, which `python -m steps.plan` prints and the flow's
`start` writes to its log; no torch."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from steps.estimate import calibrate, economy, planner
from steps.estimate.planner import CellPlan
from steps.plan import catalog, preflight
from steps.plan.matrix import expand
from steps.plan.schema import CellSpec, ConfigError, MatrixSpec


@dataclass(frozen=True)
class MatrixPlan:
    """Every cell's plan, and what the cells that will run add up to."""

    plans: dict[str, CellPlan]  # by cell id; refused cells have none
    cells: int
    runs: int  # cells not refused
    predicted_oom: list[str]
    wall_s: float | None  # summed over the cells that run (None if any is unknown)
    cost_usd: float | None
    unknown: list[str]  # cells without a time or cost prediction
    saving: economy.Saving | None = None  # under `economy:`, this run against every cell to the end


def plan_matrix(planned: list, facts: dict[str, Any] | None = None, compute: str = "local",
                predict_cell: Callable[[CellSpec], CellPlan] | None = None) -> MatrixPlan:
    """`planned`: PlannedCells (`steps.plan.matrix.expand`, after `preflight.check`);
    `predict_cell`: the planner with a calibration (`steps.estimate.calibrate`), else its defaults."""
    predict_cell = predict_cell or (lambda cell: planner.predict(cell, facts, compute))
    plans = {p.cell.cell_id: predict_cell(p.cell) for p in planned if not p.refused}
    running = list(plans.values())
    oom = [p.cell_id for p in running if p.verdict == "will not fit"]
    fitting = [p for p in running if p.verdict != "will not fit"]
    unknown = [p.cell_id for p in fitting if p.wall_s is None or p.cost_usd is None]
    walls = [p.wall_s for p in fitting if p.wall_s is not None]
    costs = [p.cost_usd for p in fitting if p.cost_usd is not None]
    return MatrixPlan(plans, len(planned), len(running), oom, sum(walls) if walls else None,
                      sum(costs) if costs else None, unknown)


def apply_settings(spec: MatrixSpec, planned: list, matrix_plan: MatrixPlan) -> tuple[list, MatrixPlan]:
    """The matrix's `plan:` settings: predicted out-of-memory cells become `skipped` rows
    (`skip_predicted_oom`); then `economy:`'s roles (each class's quality run and its speed
    cells); a predicted total over `max_cost_usd` or `max_hours` (the economy run's, under
    `economy:`) is refused with a `ConfigError` before anything runs."""
    settings = spec.plan
    out = []
    for p in planned:
        plan = matrix_plan.plans.get(p.cell.cell_id)
        if settings.skip_predicted_oom and plan is not None and plan.verdict == "will not fit":
            p = replace(p, refused=plan.reason())
        out.append(p)
    skipped = {p.cell.cell_id for p in out if p.refused}
    kept = [plan for cid, plan in matrix_plan.plans.items() if cid not in skipped]
    if spec.economy is not None:
        steps = {cid: plan.steps for cid, plan in matrix_plan.plans.items()}
        out = economy.assign(out, matrix_plan.plans, spec.economy, steps)
        matrix_plan = replace(matrix_plan, saving=economy.saving(out, matrix_plan.plans))
    problems = []
    if matrix_plan.saving is None:
        dollars = sum(p.cost_usd or 0.0 for p in kept)
        hours = sum(p.wall_s or 0.0 for p in kept) / 3600
    else:
        dollars = matrix_plan.saving.cost_usd or 0.0
        hours = (matrix_plan.saving.wall_s or 0.0) / 3600
    if settings.max_cost_usd is not None and dollars > settings.max_cost_usd:
        problems.append(f"plan.max_cost_usd: the cells that would run are predicted to cost ${dollars:,.2f}, over "
                        f"the budget of ${settings.max_cost_usd:,.2f} (`python -m steps.plan` shows each cell)")
    if settings.max_hours is not None and hours > settings.max_hours:
        problems.append(f"plan.max_hours: the cells that would run are predicted to take {hours:,.2f} h, over "
                        f"the budget of {settings.max_hours:,.2f} h (`python -m steps.plan` shows each cell)")
    if problems:
        raise ConfigError(problems, spec.name)
    return out, matrix_plan


def plan_spec(spec: MatrixSpec, check: str = "auto",
              calibration: calibrate.Calibration | None = None) -> tuple[list, MatrixPlan]:
    """The matrix's cells (refusals from the models' facts and the `plan:` settings applied)
    and their plans.

    check: `always` reads the models' facts and runs every pre-launch check (the flow's
    `start`); `auto` reads facts only for models that are not presets (their shape comes from
    there; presets' from the catalog, so a matrix of presets plans without loading torch);
    `never` reads none.
    """
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
    matrix_plan = plan_matrix(planned, facts["models"], spec.compute, predict_cell)
    planned, matrix_plan = apply_settings(spec, planned, matrix_plan)
    return planned, matrix_plan


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def show(planned: list, matrix_plan: MatrixPlan, out=None) -> None:
    """The plan as a table: one row per cell, memory per rank by part, the verdict and fix,
    time and cost; the totals under it."""
    from rich.console import Console
    from rich.table import Table

    title = (f"{matrix_plan.cells} cells: {matrix_plan.runs} run, {matrix_plan.cells - matrix_plan.runs} refused; "
             f"{len(matrix_plan.predicted_oom)} predicted out of memory")
    table = Table(title=title, show_lines=False)
    right = ("GB/rank", "load GB", "step", "tokens/s", "wall", "cost $")
    for col in ("cell", "model", "peft", "strategy", "n x gpus", "instance", "mb x ga", "precision", "seq",
                "weights", "grads", "optim", "acts", "buffers", "runtime", "GB/rank", "load GB", "step GB", "device GB",
                "verdict", "cheapest fix", "step", "tokens/s", "wall", "cost $"):
        table.add_column(col, justify="right" if col in right else "left",
                         no_wrap=col in ("cell", "cheapest fix", "verdict"))
    for p in planned:
        c = p.cell
        head = [c.cell_id, c.model, c.peft, c.strategy, f"{c.nodes} x {c.gpus}", c.instance,
                f"{c.micro_batch} x {c.grad_accum}", c.precision, str(c.seq_len)]
        plan = matrix_plan.plans.get(c.cell_id)
        if plan is None or not plan.memory_gb:
            why = f"refused: {p.refused}" if p.refused else (plan.note if plan else "")
            table.add_row(*head, *[""] * 10, why, *[""] * 5)
            continue
        m = plan.memory_gb
        style = {"fits": "green", "tight": "yellow", "will not fit": "red"}.get(plan.verdict, "")
        memory_cells = [_gb(m[k]) for k in ("weights", "grads", "optim", "activations", "buffers", "runtime")]
        table.add_row(*head, *memory_cells, _gb(plan.total_gb), _gb(plan.load_gb), _gb(plan.step_gb),
                      _gb(plan.device_gb),
                      f"[{style}]{plan.verdict}[/]" if style else plan.verdict,
                      plan.fix or ("none found" if plan.verdict == "will not fit" else ""),
                      "?" if plan.step_s is None else f"{plan.step_s:.3g} s",
                      "?" if plan.tokens_per_s is None else f"{plan.tokens_per_s:,.0f}", _duration(plan.wall_s),
                      "?" if plan.cost_usd is None else f"{plan.cost_usd:,.2f}")
    console = Console(file=out or sys.stdout, width=260)
    console.print(table)
    fitting = matrix_plan.runs - len(matrix_plan.predicted_oom)
    cost = "?" if matrix_plan.cost_usd is None else f"${matrix_plan.cost_usd:,.2f}"
    console.print(f"Cells predicted to fit: {fitting}, one after another {_duration(matrix_plan.wall_s)}, {cost}"
                  + (f" ({len(matrix_plan.unknown)} without a prediction)" if matrix_plan.unknown else ""))
    if matrix_plan.saving is not None:
        show_economy(planned, matrix_plan.saving, console)


def _money(x: float | None) -> str:
    return "?" if x is None else f"${x:,.2f}"


def show_economy(planned: list, saving: economy.Saving, console) -> None:
    """`economy:`'s classes (what each shares, its quality run, its speed cells) and the run's
    predicted training time, device time and cost against every cell trained to the end."""
    from rich.table import Table

    classes = economy.summary(planned)
    table = Table(title=f"economy: {len(classes)} equivalence classes, {saving.quality_runs} cells trained to the "
                        f"end, {saving.speed_cells} for their speed steps")
    for col in ("class", "shares", "trained to the end", "speed cells (validation shared)"):
        table.add_column(col, no_wrap=col == "class")
    for c in classes:
        table.add_row(c["class"], c["what"], ", ".join(c["quality"]), ", ".join(c["speed"]) or "-")
    console.print(table)
    ratio = "?" if saving.ratio is None else f"{saving.ratio:.2f}x"
    console.print(f"Economy: training {_duration(saving.train_s)} against {_duration(saving.full_train_s)} for every "
                  f"cell to the end ({ratio}); device time {_duration(saving.device_s)} against "
                  f"{_duration(saving.full_device_s)}; cost {_money(saving.cost_usd)} against "
                  f"{_money(saving.full_cost_usd)}")
