"""A whole matrix planned: its cells checked (the models' facts, the pre-launch checks), every
cell predicted, the matrix's `plan:` settings applied (predicted out-of-memory cells skipped,
budgets refused), and the plan's table, which `python -m steps.plan` prints and the flow's
`start` writes to its log; no torch."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from steps.estimate import calibrate, cost, economy, planner
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
    probes: dict[str, Any] = field(default_factory=dict)  # this machine's probe entries, by cell id
    cost_note: str | None = None  # why no cell has a price, where the compute has none to give


SLURM_NO_PRICE = ("cost unknown: compute slurm prices a cell at your cluster's own rate, which the catalog's "
                  "cloud prices are not; set remote.price_per_gpu_hour (your allocation's rate per GPU-hour)")


def plan_matrix(planned: list, facts: dict[str, Any] | None = None, compute: cost.Compute = "local",
                predict_cell: Callable[[CellSpec], CellPlan] | None = None) -> MatrixPlan:
    """`planned`: PlannedCells (`steps.plan.matrix.expand`, after `preflight.check`);
    `predict_cell`: the planner with a calibration (`steps.estimate.calibrate`), else its defaults."""
    predict_cell = predict_cell or (lambda cell: planner.predict(cell, facts, compute))
    plans = {p.cell.cell_id: predict_cell(p.cell) for p in planned if not p.refused}
    return MatrixPlan(plans, **_totals(planned, plans))


def _totals(planned: list, plans: dict[str, CellPlan]) -> dict[str, Any]:
    """What the cells that run add up to: a cell refused (by a check, or by the `plan:` settings
    after it was predicted) neither runs nor counts in the time and cost."""
    running = [plans[p.cell.cell_id] for p in planned if not p.refused and p.cell.cell_id in plans]
    oom = [p.cell_id for p in running if p.verdict == "will not fit"]
    fitting = [p for p in running if p.verdict != "will not fit"]
    walls = [p.wall_s for p in fitting if p.wall_s is not None]
    costs = [p.cost_usd for p in fitting if p.cost_usd is not None]
    return {"cells": len(planned), "runs": sum(not p.refused for p in planned), "predicted_oom": oom,
            "wall_s": sum(walls) if walls else None, "cost_usd": sum(costs) if costs else None,
            "unknown": [p.cell_id for p in fitting if p.wall_s is None or p.cost_usd is None]}


FAR_OVER = 2.0  # a cell predicted to need this many times its memory is refused (plan.try_predicted_oom)


def far_over(cell: CellSpec, plan: CellPlan) -> str | None:
    """Why a cell predicted far beyond its memory is not launched; None for the close calls
    (the planner's memory is within 8% of what this machine measures, 4% of an H100's)."""
    if plan.peak_gb is None or not plan.device_gb or plan.peak_gb <= FAR_OVER * plan.device_gb:
        return None
    capped = cell.train.memory_cap_gb is not None and cell.train.memory_cap_gb <= plan.device_gb
    change = (f"raise train.memory_cap_gb ({cell.train.memory_cap_gb:g})" if capped
              else f"use an instance with more memory per device than {cell.instance}")
    return (f"{plan.reason()}; {plan.peak_gb / plan.device_gb:.1f}x what a rank may use, refused before launch: "
            f"{change} or make the cell smaller, or set plan.try_predicted_oom: true to launch it anyway")


def times_out(cell: CellSpec, plan: CellPlan) -> str | None:
    """A cell whose planned wall time, at the fast end of its interval, is over its time limit
    would end `timeout` after spending it: refused with the plan instead. (Not under `economy:`,
    whose speed cells train only their first steps.)"""
    fastest = plan.wall_s_range[0] if plan.wall_s_range else None
    if fastest is None or fastest <= cell.train.timeout_s:
        return None
    return (f"planned to take {_duration(plan.wall_s)} (at least {_duration(fastest)}: {plan.steps} steps, start-up "
            f"and evaluations), over train.timeout_s={cell.train.timeout_s:g}: it would end `timeout`; raise "
            f"train.timeout_s or lower train.max_steps")


def step_problems(planned: list, plans: dict[str, CellPlan]) -> list[str]:
    """Step counts that make a setting meaningless: a timing warm-up that leaves no timed step
    (no tokens/s), a learning-rate warm-up longer than the run (lr never reached)."""
    problems: dict[str, str] = {}
    for p in planned:
        plan, t = plans.get(p.cell.cell_id), p.cell.train
        steps = plan.steps if plan is not None else None
        if steps is None:
            continue
        if t.timing_warmup_steps >= steps:
            problems.setdefault(f"timing{t.timing_warmup_steps}/{steps}", (
                f"train.timing_warmup_steps: {t.timing_warmup_steps} leaves no timed step of the {steps} the cell "
                f"trains ({p.cell.cell_id}), so it measures no tokens/s; use timing_warmup_steps < {steps}, or "
                f"train longer"))
        if t.lr_warmup_steps > steps:
            problems.setdefault(f"lr{t.lr_warmup_steps}/{steps}", (
                f"train.lr_warmup_steps: {t.lr_warmup_steps} is longer than the {steps} steps the cell trains "
                f"({p.cell.cell_id}): its learning rate would never reach lr; use lr_warmup_steps <= {steps}"))
    return list(problems.values())


def apply_settings(spec: MatrixSpec, planned: list, matrix_plan: MatrixPlan) -> tuple[list, MatrixPlan]:
    """The matrix's `plan:` settings: cells predicted far beyond their memory (`far_over`), and
    with `skip_predicted_oom` every predicted out-of-memory cell, become `skipped` rows with the
    estimate; then `economy:`'s roles (each class's quality run and its speed
    cells); a predicted total over `max_cost_usd` or `max_hours` (the economy run's, under
    `economy:`) is refused with a `ConfigError` before anything runs."""
    settings = spec.plan
    out = []
    for p in planned:
        plan = matrix_plan.plans.get(p.cell.cell_id)
        if plan is not None and plan.verdict == "will not fit":
            far = None if settings.try_predicted_oom else far_over(p.cell, plan)
            if far or settings.skip_predicted_oom:
                p = replace(p, refused=far or plan.reason())
        if plan is not None and not p.refused and spec.economy is None:
            p = replace(p, refused=times_out(p.cell, plan))
        out.append(p)
    skipped = {p.cell.cell_id for p in out if p.refused}
    kept = [plan for cid, plan in matrix_plan.plans.items() if cid not in skipped]
    if spec.economy is not None:
        steps = {cid: plan.steps for cid, plan in matrix_plan.plans.items()}
        out = economy.assign(out, matrix_plan.plans, spec.economy, steps)
        matrix_plan = replace(matrix_plan, saving=economy.saving(out, matrix_plan.plans))
    matrix_plan = replace(matrix_plan, **_totals(out, matrix_plan.plans))
    problems = step_problems([p for p in out if not p.refused], matrix_plan.plans)
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


def plan_spec(spec: MatrixSpec, check: str = "auto", calibration: calibrate.Calibration | None | bool = True,
              probe: bool | None = None, echo=print) -> tuple[list, MatrixPlan]:
    """The matrix's cells (refusals from the models' facts and the `plan:` settings applied)
    and their plans.

    check: `always` reads the models' facts and runs every pre-launch check (the flow's
    `start`); `auto` reads facts only for models that are not presets (their shape comes from
    there; presets' from the catalog, so a matrix of presets plans without loading torch);
    `never` reads none. calibration: True fits the store's (`steps.estimate.store`), False or
    None plans from first principles, or a calibration to use. probe: time this machine's cells
    (`steps.estimate.probe`, cached); None: the matrix's `plan.probe`, unless
    FINETUNE_MATRIX_PROBE=0.
    """
    from steps.estimate import probe as probing
    from steps.estimate import store

    planned = expand(spec)
    presets = catalog.model_presets()
    needed = check == "always" or (check == "auto" and any(p.cell.model not in presets for p in planned))
    facts: dict[str, Any] = preflight.gather_facts([p.cell for p in planned]) if needed else {"models": {}}
    if needed:
        planned = preflight.check(spec, planned, facts)
    if calibration is True:
        calibration = store.calibration()
    if probe is None:
        probe = spec.plan.probe and os.environ.get("FINETUNE_MATRIX_PROBE", "1") != "0"
    live = [p.cell for p in planned if not p.refused]
    probes = probing.profile(live, echo=echo, facts=facts["models"]) if probe else {}

    def predict_cell(cell):
        return calibrate.predict(cell, calibration or None, cost.Pricing.of(spec), facts["models"], fixes=True,
                                 probe=probes.get(cell.cell_id))
    matrix_plan = plan_matrix(planned, facts["models"], cost.Pricing.of(spec), predict_cell)
    planned, matrix_plan = apply_settings(spec, planned, matrix_plan)
    note = SLURM_NO_PRICE if spec.compute == "slurm" and spec.remote.price_per_gpu_hour is None else None
    return planned, replace(matrix_plan, probes=probes, cost_note=note)


def _gb(x: float | None) -> str:
    return planner.gb(x, missing="-")  # the plan's table: a dash where a part is unknown


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def _k(x: float | None, digits: int = 3) -> str:
    """A rate in few characters: 980, 12.3k, 1.2M."""
    if x is None:
        return "?"
    if x < 1e3:
        return f"{x:.0f}"
    value, unit = (x / 1e3, "k") if x < 1e6 else (x / 1e6, "M")
    text = f"{value:.{digits}g}"
    return (f"{value:.0f}" if "e" in text else text) + unit  # 110k, never 1.1e+02k


CSV_COLUMNS = ("cell_id", "model", "peft", "strategy", "nodes", "gpus", "world_size", "instance", "micro_batch",
               "grad_accum", "precision", "seq_len", "refused", "weights", "grads", "optim", "activations", "buffers",
               "runtime", "gb_per_rank", "load_gb", "step_gb", "peak_gb", "device_gb", "verdict", "fix", "step_s",
               "tokens_per_s", "tokens_per_s_low", "tokens_per_s_high", "steps", "startup_s", "eval_s", "wall_s",
               "wall_s_low", "wall_s_high", "cost_usd", "cost_usd_low", "cost_usd_high", "basis", "depth",
               "calibration", "note", "probe")


def rows(planned: list, matrix_plan: MatrixPlan) -> list[dict[str, Any]]:
    """The plan as `plan.csv` holds it: one row per cell, every part and every interval."""
    out = []
    for p in planned:
        c, plan = p.cell, matrix_plan.plans.get(p.cell.cell_id)
        row: dict[str, Any] = {"cell_id": c.cell_id, "model": c.model, "peft": c.peft, "strategy": c.strategy,
                               "nodes": c.nodes, "gpus": c.gpus, "world_size": c.world_size, "instance": c.instance,
                               "micro_batch": c.micro_batch, "grad_accum": c.grad_accum, "precision": c.precision,
                               "seq_len": c.seq_len, "refused": p.refused or ""}
        if plan is not None:
            row.update(plan.memory_gb)
            row.update(gb_per_rank=plan.total_gb, load_gb=plan.load_gb, step_gb=plan.step_gb, peak_gb=plan.peak_gb,
                       device_gb=plan.device_gb, verdict=plan.verdict, fix=plan.fix or "", step_s=plan.step_s,
                       tokens_per_s=plan.tokens_per_s, steps=plan.steps, startup_s=plan.startup_s,
                       eval_s=plan.eval_s, wall_s=plan.wall_s, cost_usd=plan.cost_usd, basis=plan.basis,
                       depth=plan.depth or "", calibration=plan.calibration or "", note=plan.note or "")
            for what in ("tokens_per_s", "wall_s", "cost_usd"):
                span = getattr(plan, f"{what}_range")
                if span:
                    row[f"{what}_low"], row[f"{what}_high"] = span
        entry = matrix_plan.probes.get(c.cell_id)
        row["probe"] = json.dumps(entry, sort_keys=True) if entry else ""
        out.append(row)
    return out


def write_csv(planned: list, matrix_plan: MatrixPlan, path: Path) -> Path:
    """`plan.csv`: what the table shows and the breakdown by part, each interval, the
    calibration and probe entry each prediction used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows(planned, matrix_plan):
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def _short_duration(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def short_id(cell: CellSpec) -> str:
    """The cell id without what the method, strategy and ranks columns beside it say (its hash
    still names it: plan.csv and --wide have the whole id)."""
    middle = f"-{cell.peft}-{cell.strategy}-{cell.nodes}x{cell.gpus}-"
    if middle not in cell.cell_id:
        return cell.cell_id
    model, digest = cell.cell_id.split(middle, 1)
    return f"{model} {digest[:6]}"


def show(planned: list, matrix_plan: MatrixPlan, out=None, wide: bool = False, width: int | None = None,
         max_rows: int | None = None) -> None:
    """The plan as a table that fits a 120-column terminal (a wider terminal's width, or `width`):
    the columns that decide (the breakdown by part with `wide`, and always in plan.csv); the
    totals and the calibrations used under it. `max_rows`: at most so many cells (the refused and
    those that will not fit first), the rest counted under it (`start`'s log of a 1,000-cell
    matrix; plan.csv has them all). A table wider than the console loses a column or two off every
    column but the verdict, which keeps its longest word ("will not fi" otherwise)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    title = (f"{matrix_plan.cells} cells: {matrix_plan.runs} run, {matrix_plan.cells - matrix_plan.runs} refused; "
             f"{len(matrix_plan.predicted_oom)} predicted out of memory")
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0))
    parts = ("weights", "grads", "optim", "acts", "buffers", "runtime", "load GB", "step GB") if wide else ()
    fix = ("cheapest fix",) if wide else ()  # narrow: the fixes are listed under the table
    columns = ("cell", "method", "strategy", "ranks", "mb×ga", *(("model", "instance", "precision", "seq")
               if wide else ()), *parts, "GB/rank/dev", "verdict", *fix, "tokens/s", "interval",
               "wall", "$", *(("basis",) if wide else ()))
    for col in columns:
        table.add_column(col, justify="right" if col in ("ranks", "tokens/s", "interval", "wall", "$")
                         else "left", overflow="fold", no_wrap=col != "cheapest fix",
                         min_width={"cheapest fix": 10, "verdict": len("will not fit")}.get(col))
    shown = planned
    if max_rows is not None and len(planned) > max_rows:
        def worst(p):
            plan = matrix_plan.plans.get(p.cell.cell_id)
            return 0 if p.refused else 1 if plan is not None and plan.verdict == "will not fit" else 2
        keep = {id(p) for p in sorted(planned, key=worst)[:max_rows]}
        shown = [p for p in planned if id(p) in keep]
    for p in shown:
        c = p.cell
        head = [c.cell_id if wide else short_id(c), c.peft, c.strategy, str(c.world_size),
                f"{c.micro_batch}x{c.grad_accum}"]
        if wide:
            head += [c.model, c.instance, c.precision, str(c.seq_len)]
        plan = matrix_plan.plans.get(c.cell_id)
        if plan is None or not plan.memory_gb:
            verdict = "[red]refused[/]" if p.refused else "?"  # no prediction: plan.csv's `note` says why
            table.add_row(*head, *[""] * len(parts), "", verdict, *[""] * (len(columns) - len(head) - len(parts) - 2))
            continue
        m = plan.memory_gb
        verdict = "refused" if p.refused else plan.verdict  # the reason: plan.csv's `refused`, the results row
        style = {"fits": "green", "tight": "yellow", "will not fit": "red", "refused": "red"}.get(verdict, "")
        memory = [_gb(m[k]) for k in ("weights", "grads", "optim", "activations", "buffers", "runtime")]
        memory += [_gb(plan.load_gb), _gb(plan.step_gb)]
        span = plan.tokens_per_s_range
        table.add_row(*head, *(memory if wide else []), f"{_gb(plan.peak_gb)}/{_gb(plan.device_gb)}",
                      f"[{style}]{verdict}[/]" if style else verdict,
                      *((_fix(plan),) if wide else ()),
                      _k(plan.tokens_per_s), f"{_k(span[0], 2)}-{_k(span[1], 2)}" if span else "",
                      _short_duration(plan.wall_s), "?" if plan.cost_usd is None else f"{plan.cost_usd:,.2f}",
                      *((plan.basis + (" + calibrated" if plan.calibration else ""),) if wide else ()))
    if width is None:  # a terminal wider than the default gives the table its room
        terminal = shutil.get_terminal_size((0, 0)).columns if out is None else 0
        width = max(260 if wide else 120, terminal)
    console = Console(file=out or sys.stdout, width=width)
    console.print(table)
    if len(shown) < len(planned):
        console.print(f"... and {len(planned) - len(shown)} more cells (the refused and those predicted not to fit "
                      f"are above; plan.csv and `python -m steps.plan` have every cell)")
    show_refusals(shown, console)
    if not wide:
        show_fixes(shown, matrix_plan, console)
    fitting = matrix_plan.runs - len(matrix_plan.predicted_oom)
    dollars = "?" if matrix_plan.cost_usd is None else f"${matrix_plan.cost_usd:,.2f}"
    console.print(f"Cells predicted to fit: {fitting}, one after another {_duration(matrix_plan.wall_s)}, {dollars}"
                  + (f" ({len(matrix_plan.unknown)} without a prediction)" if matrix_plan.unknown else ""))
    if matrix_plan.cost_note:
        console.print(matrix_plan.cost_note, highlight=False)
    console.print(basis_summary(matrix_plan), soft_wrap=False)
    if matrix_plan.saving is not None:
        show_economy(planned, matrix_plan.saving, console)


def _fix(plan: CellPlan) -> str:
    return plan.fix or ("none found" if plan.verdict == "will not fit" else "")


def show_fixes(planned: list, matrix_plan: MatrixPlan, console) -> None:
    """The cheapest change that fits, for each cell of the table that will not fit or is tight,
    under it (a column would leave no room in 120 characters; `--wide` has it as one)."""
    lines = []
    for p in planned:
        plan = matrix_plan.plans.get(p.cell.cell_id)
        if not p.refused and plan is not None and plan.memory_gb and plan.verdict != "fits":
            lines.append(f"- {short_id(p.cell)} ({plan.verdict}, {_gb(plan.peak_gb)}/{_gb(plan.device_gb)} GB): "
                         f"{_fix(plan) or 'nothing to change'}")
    if lines:
        console.print("Cheapest fix:")
        for line in lines:
            console.print(line, highlight=False)


def show_refusals(planned: list, console) -> None:
    """Why each refused cell of the table is refused, under it: one line per distinct reason with
    the cells it refuses (the table's rows only say `refused`; plan.csv's `refused` has each)."""
    reasons: dict[str, list[str]] = {}
    for p in planned:
        if p.refused:
            reasons.setdefault(p.refused, []).append(short_id(p.cell))
    if reasons:
        console.print("Refused before launch:")
    for reason, cells in reasons.items():
        named = ", ".join(cells[:4]) + (f" and {len(cells) - 4} more" if len(cells) > 4 else "")
        console.print(f"- {named}: {reason}", highlight=False)


def basis_summary(matrix_plan: MatrixPlan) -> str:
    """Where the times come from: how many cells the probe timed, which calibrations were used,
    how many were planned from first principles. Intervals: the calibration's held-out spread."""
    plans = [p for p in matrix_plan.plans.values() if p.step_s is not None]
    probed = sum(p.basis == "probe" for p in plans)
    used: dict[str, int] = {}
    for p in plans:
        if p.calibration:
            source = p.calibration.split(";")[0]
            used[source] = used.get(source, 0) + 1
    first = sum(not p.calibration for p in plans)
    parts = [f"time: {probed} of {len(plans)} cells timed by the probe on this machine"]
    parts += [f"{n} calibrated on {source}" for source, n in used.items()]
    if first:
        parts.append(f"{first} from first principles (no calibration covers them: wider intervals)")
    return "; ".join(parts) + ". Intervals: the calibration's held-out spread (plan.csv has every column)."


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
