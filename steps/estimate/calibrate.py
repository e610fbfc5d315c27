"""The planner scored against what ran: each measured cell's plan beside its measurement, and
efficiencies fitted from measured runs (`python -m steps.plan X.yaml --calibrate RUN...`); no
torch.

A results table holds every setting of a cell as a column, so each row is turned back into the
cell that ran and planned again. Per (device, strategy, precision, method), falling back to
(device, strategy, precision), (device, strategy), then the device, a robust line through the
measured step times against the ideal ones (FLOPs over peak) gives a per-step overhead and an
efficiency. Tokens/s counts real tokens (no padding): the fit also keeps, per data setup, the
share of each step's token slots that real tokens fill.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.estimate import cost, planner, step_time
from steps.plan import catalog, lora_kernels
from steps.plan.schema import CellSpec
from steps.plan.settings import contended, leaf_paths, put

if TYPE_CHECKING:  # tables are read only when runs are (the flow's steps load no pandas)
    import pandas as pd

TOP = ("model", "peft", "strategy", "instance", "nodes", "gpus", "lr", "micro_batch", "grad_accum", "precision",
       "seq_len", "cell_id")
Calibration = dict[str, Any]  # {"efficiency": {key: value}, "overhead_s": {key: value}, "fill": {key: value}}


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def cell_of_row(row: Any) -> CellSpec:
    """The cell a results-table row measured (settings missing from older tables: defaults)."""
    sections: dict[str, Any] = {"train": {}, "data": {}}
    for path in leaf_paths():
        value = row.get(path)
        if _missing(value):
            continue
        if isinstance(value, str) and value[:1] in "[{":
            value = json.loads(value)
        sections = put(sections, path, value.item() if hasattr(value, "item") else value)
    top = {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in TOP if k in row}
    return CellSpec.model_validate({**top, **sections})


def as_trained(cell: CellSpec, row: Any) -> CellSpec:
    """The cell as it ran: a speed cell (`economy:`) trained its class's first `train_steps`
    steps, and is planned for those."""
    steps = row.get("train_steps")
    if not isinstance(row.get("quality_from"), str) or _missing(steps):
        return cell
    return cell.model_copy(update={"train": cell.train.model_copy(update={"stop_after_steps": int(steps)})})


def _as_run(row: Any, key: str) -> Any:
    """What the cell spent: the report projects a speed cell's to its full run and keeps what
    it ran as `ran_<key>`."""
    ran = row.get(f"ran_{key}")
    return row.get(key) if _missing(ran) else ran


PLAN_CSV = "plan.csv"  # the plan `start` printed, in the run's folder (`matrix_plan.write_csv`)


def run_probes(paths: list[str | Path]) -> dict[str, Any]:
    """The probe entries runs were planned with, by cell id: each run folder's plan.csv (what
    `start` printed), or a twin's probe.json."""
    import csv

    out: dict[str, Any] = {}
    for p in map(Path, paths):
        folder = p if p.is_dir() else p.parent
        if (folder / "probe.json").exists():
            out.update(json.loads((folder / "probe.json").read_text()).get("cells", {}))
        if (folder / PLAN_CSV).exists():
            with open(folder / PLAN_CSV, newline="", encoding="utf-8") as fh:
                out.update({r["cell_id"]: json.loads(r["probe"]) for r in csv.DictReader(fh) if r.get("probe")})
    return out


def read_runs(paths: list[str | Path]) -> pd.DataFrame:
    """The results tables of runs (a run folder or a table file each)."""
    import pandas as pd

    frames = []
    for p in map(Path, paths):
        table = p / "results.parquet" if p.is_dir() else p
        frames.append(pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def device_model(cell: CellSpec) -> str:
    """The device a calibration is kept for: "cpu" for this machine's CPU types, the GPU's model
    ("H100", "A10G") for GPU instances, whatever the instance around it."""
    entry = catalog.instances().get(cell.instance)
    name = entry.accelerator if entry is not None else cell.instance
    if entry is not None and entry.local_gpu:
        name = " ".join(n for n, _ in catalog.local_gpus()[:1]) or name
    found = re.search(r"\b([AHBLTV]\d{1,3}[A-Z]?)\b", name.replace("-", " "))
    return found.group(1) if found and name != "cpu" else name


def shape(cell: CellSpec) -> str:
    """What sets the cell's step time, as a hash: every setting but its id, matrix, learning
    rate, seeds and how long it trains (`step_time.timed`), so that the cells of a
    learning-rate sweep, and a matrix run again, share it."""
    body = step_time.timed(cell).model_dump(mode="json",
                                            exclude={"cell_id", "matrix", "repeat", "track", "track_context"})
    body["train"].pop("seed", None)
    body["data"].pop("seed", None)
    body["train"]["lora_kernels"] = lora_kernels.applies(cell)  # as it runs: auto is false where they cannot
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def _keys(cell: CellSpec, depth: str | None = None) -> list[str]:
    """First the cell's own shape (`shape`: the same cell measured before, the best evidence of
    its time), then from the most specific to the device: the CPU type's cores per rank (local-cpu,
    local-cpu-2c) where the device is this machine's CPU, the strategy, precision and method,
    then the fast paths (compiled layers, Liger, the chunked loss, the fused optimizer). A probed
    cell's `depth` (timed whole or extrapolated from cuts, `planner.CellPlan.depth`) splits the
    two specific levels: the twins' 8-layer cells extrapolated from cuts ran about 1.35x their
    plan, those timed whole about 1.0x."""
    device = device_model(cell)
    where = cell.instance if device == "cpu" else "gpu"
    t = cell.train
    paths = f"compile={t.compile},liger={t.liger},loss={t.loss},fused={t.fused_optimizer}" + (
        ",lora_kernels" if lora_kernels.applies(cell) else "")  # as the cell runs
    # fp32 on TF32 tensor cores reaches another share of another peak than on CUDA cores
    precision = "fp32+tf32" if cell.precision == "fp32" and catalog.tf32(cell) else cell.precision
    base = f"{device}|{where}|{cell.strategy}|{precision}|{cell.peft}"
    broad = [f"{device}|{where}|{cell.strategy}", f"{device}|{where}"]
    specific = [f"{base}|{paths}", base]
    split = [x for k in specific for x in ((f"{k}|{depth}", k) if depth else (k,))]
    return [f"{device}|shape={shape(cell)}", *split, *broad, device]


def _startup_keys(cell: CellSpec) -> list[str]:
    device = device_model(cell)
    return [f"{device}|{cell.instance}|{cell.strategy}|{cell.world_size}", f"{device}|{cell.world_size}", device]


def measured(rows: pd.DataFrame) -> list[tuple[CellSpec, Any]]:
    """The rows that trained with a step time (`ok`, or a speed cell's steps), as (cell, row)."""
    return [(cell_of_row(r), r) for _, r in rows.iterrows() if _trained(r)]


@dataclass(frozen=True)
class Record:
    """One measured cell: what it was, what it measured, what the probe said before it ran."""

    cell: CellSpec
    row: Any
    probe: dict[str, Any] | None
    run: str
    date: str | None


def _trained(row: Any) -> bool:
    return row.get("outcome") == "ok" and not _missing(row.get("step_s")) and not _missing(row.get("tokens_per_s"))


def record_of(row: Any, probe: dict[str, Any] | None = None, run: str | None = None) -> Record | None:
    """A measured row (a table's, or a store entry's dict) as the calibration fits it; None for
    a row without a step time, or one that ran on a busy machine (`settings.contended`: its step
    time is the contention's as much as the cell's)."""
    if not _trained(row) or contended(row.get("other_cpu_share")):
        return None
    return Record(as_trained(cell_of_row(row), row), row, probe, str(run or row.get("run_id")), _date(row))


def _date(row: Any) -> str | None:
    """The day a row's cell ended (epoch seconds in results tables, ISO text in bench files)."""
    import datetime

    value = row.get("ended_at")
    value = row.get("started_at") if _missing(value) else value
    if _missing(value):
        return None
    if isinstance(value, (int, float)):
        return datetime.datetime.fromtimestamp(float(value), datetime.timezone.utc).date().isoformat()
    return str(value)[:10]


def records(rows: pd.DataFrame, probes: dict[str, Any] | None = None, run: str | None = None) -> list[Record]:
    """A results table's measured cells with the probe entries they were planned with (a run's
    plan.csv, or a twin's probe.json)."""
    out = (record_of(r, (probes or {}).get(r["cell_id"]), run) for _, r in rows.iterrows())
    return [r for r in out if r is not None]


def _first_principles(rec: Record) -> planner.CellPlan:
    return planner.predict(rec.cell, probe=rec.probe, fixes=False)


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(overhead, seconds per predicted second) of a Theil-Sen line through (predicted,
    measured) points: the median of the pairwise slopes and of the intercepts they leave, so
    that a cell slowed by a busy machine moves the fit little. Both kept positive; with one
    predicted time only, a line through the origin."""
    slopes = [(yj - yi) / (xj - xi) for (xi, yi), (xj, yj) in itertools.combinations(points, 2)
              if abs(xj - xi) > 0.05 * max(xi, xj)]
    slope = statistics.median(slopes) if slopes else 0.0
    if slope > 0:
        overhead = statistics.median(y - slope * x for x, y in points)
        if overhead >= 0:
            return overhead, slope
    return 0.0, statistics.median(y / x for x, y in points)


def _fit(recs: list[Record], first: list[planner.CellPlan]) -> Calibration:
    """The lines and shares of `recs`, each beside its first-principles plan (`first`)."""
    steps: dict[str, list[tuple[float, float]]] = {}
    starts: dict[str, list[float]] = {}
    evals: dict[str, list[float]] = {}
    for rec, plan in zip(recs, first, strict=True):
        if plan.step_s:
            for key in _keys(rec.cell, plan.depth):
                steps.setdefault(key, []).append((plan.step_s, float(rec.row["step_s"])))
        overhead = rec.row.get("overhead_s")
        if plan.startup_s and not _missing(overhead):
            for key in _startup_keys(rec.cell):
                starts.setdefault(key, []).append(float(overhead) / plan.startup_s)
        eval_s = rec.row.get("eval_s")
        if plan.eval_s and not _missing(eval_s) and eval_s > 0:
            evals.setdefault(device_model(rec.cell), []).append(float(eval_s) / plan.eval_s)
    return {"step": {k: [*_line(v), len(v)] for k, v in steps.items()},
            "startup": {k: [statistics.median(v), len(v)] for k, v in starts.items()},
            "eval": {k: statistics.median(v) for k, v in evals.items()}}


def fit(recs: list[Record] | pd.DataFrame) -> Calibration:
    """Per key (device, instance, strategy, precision, method; then coarser), a line from the
    first-principles step time (the probe's, or the catalog's peak) to the measured one; the
    start-up's and the evaluations' measured share of their prediction; and how far the fit
    misses a run it did not see (each of the latest runs' cells predicted from the others): the spread
    that sets the intervals. `recs`: `records(...)`, or a results table (no probe entries)."""
    recs = records(recs) if not isinstance(recs, list) else recs
    first = [_first_principles(r) for r in recs]  # once: every fit below reads them
    calibration = _fit(recs, first)
    residuals: dict[str, dict[str, list[float]]] = {}
    dates = {r.run: r.date or "" for r in recs}
    runs = sorted(dates, key=lambda run: (dates[run], run))
    for run in runs[-HELD_OUT_RUNS:] if len(runs) > 1 else []:
        rest = [i for i, r in enumerate(recs) if r.run != run]
        others = _fit([recs[i] for i in rest], [first[i] for i in rest])
        for rec, fp in ((r, p) for r, p in zip(recs, first, strict=True) if r.run == run):
            plan = apply(rec.cell, fp, others)
            if not plan.calibration:
                continue
            used = _step_key(rec.cell, others, fp.depth)
            into = residuals.setdefault(_spread_key(rec.cell, used), {"tokens_per_s": [], "wall_s": []})
            into["tokens_per_s"].append(abs(math.log(plan.tokens_per_s / float(rec.row["tokens_per_s"]))))
            wall = _as_run(rec.row, "wall_s")
            if plan.wall_s and not _missing(wall):
                into["wall_s"].append(abs(math.log(plan.wall_s / float(wall))))
    calibration["spread"] = {d: {k: max(SPREAD_FLOOR, _quantile(v, SPREAD_QUANTILE)) if v else UNCOVERED["probe"]
                                 for k, v in parts.items()} for d, parts in residuals.items()}
    source: dict[str, dict[str, Any]] = {}
    for rec in recs:
        s = source.setdefault(device_model(rec.cell), {"cells": 0, "runs": set(), "dates": set()})
        s["cells"] += 1
        s["runs"].add(rec.run)
        if rec.date:
            s["dates"].add(rec.date)
    calibration["source"] = {d: {"cells": s["cells"], "runs": len(s["runs"]),
                                 "from": min(s["dates"], default=None), "to": max(s["dates"], default=None)}
                             for d, s in source.items()}
    return calibration


HELD_OUT_RUNS = 5  # the latest runs each held out once for the spread (each is a fit of the rest)
SPREAD_QUANTILE = 0.9  # of the held-out |log(planned / measured)|: the interval's half-width
SPREAD_FLOOR = 0.05  # no interval narrower than 5% either side: the machine's own noise
# Half-widths (log) where no calibration covers the cell: the probe's first-principles misses on
# this machine's twins, and the catalog's peaks on GPUs measured once.
UNCOVERED = {"probe": 0.4, "catalog": 0.7}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


MIN_CELLS = 3  # a key's line is used from this many measured cells on; fewer fall back to a coarser key
# but the cell's own shape, measured once: make run's second run (the same 4 cells) came to
# 3.5-7.6% off the first's measurement, against 7.4-13.8% through the 4 cells' one line.


def _step_key(cell: CellSpec, calibration: Calibration | None, depth: str | None = None) -> str | None:
    """The most specific key with a line fitted on enough cells (held out on the five twins:
    one or two cells of a key overfit it; from three on each twin's median error is at most 21%);
    where no key has as many (a GPU measured once), the most specific that has any."""
    lines = (calibration or {}).get("step", {})
    found = [k for k in _keys(cell, depth) if k in lines]
    return next((k for k in found if lines[k][2] >= (1 if "|shape=" in k else MIN_CELLS)),
                found[0] if found else None)


def _spread_key(cell: CellSpec, key: str | None) -> str:
    """The spread a plan's interval takes, given the step key it was planned with: a shape
    planned from its own measurements misses by a run's noise (`<device>|shape`), one planned
    through cells like it by more (`<device>`): a store of repeats must not narrow the interval
    of a shape it never saw."""
    return f"{device_model(cell)}|shape" if key and "|shape=" in key else device_model(cell)


def describe(cell: CellSpec, calibration: Calibration | None, depth: str | None = None) -> str:
    """Which calibration a prediction used: its device, cells, runs and dates, and the key."""
    key = _step_key(cell, calibration, depth)
    if key is None:
        return ""
    src = calibration.get("source", {}).get(device_model(cell), {})
    when = f", {src['from']}..{src['to']}" if src.get("from") else ""
    n = calibration["step"][key][2]
    cells, runs = src.get("cells", "?"), src.get("runs", "?")
    like = f"this shape measured {n}x" if "|shape=" in key else f"{n} like it ({key})"
    return f"{device_model(cell)}: {cells} cells of {runs} runs{when}; {like}"


def _range(x: float | None, q: float) -> tuple[float, float] | None:
    return None if x is None else (x * math.exp(-q), x * math.exp(q))


def predict(cell: CellSpec, calibration: Calibration | None, compute: cost.Compute = "local",
            facts: dict[str, Any] | None = None, fixes: bool = False,
            probe: dict[str, Any] | None = None) -> planner.CellPlan:
    """The planner's answer with the calibration applied, and its intervals: the calibration's
    held-out spread where it covers the cell, wider where not."""
    return apply(cell, planner.predict(cell, facts, compute, fixes=fixes, probe=probe), calibration, compute)


def apply(cell: CellSpec, plan: planner.CellPlan, calibration: Calibration | None,
          compute: cost.Compute = "local") -> planner.CellPlan:
    """A first-principles plan of `cell` calibrated, with its intervals."""
    if plan.step_s is None:
        return plan
    calibration = calibration or {}
    key = _step_key(cell, calibration, plan.depth)
    step, startup, eval_s = plan.step_s, plan.startup_s or 0.0, plan.eval_s or 0.0
    if key is not None:
        overhead, slope, _ = calibration["step"][key]
        step = overhead + slope * plan.step_s
    start_key = next((k for k in _startup_keys(cell) if k in calibration.get("startup", {})), None)
    if start_key is not None:
        startup *= calibration["startup"][start_key][0]
    eval_s *= calibration.get("eval", {}).get(device_model(cell), 1.0)
    tokens = plan.tokens_per_s * plan.step_s / step
    n, wall, dollars = cost.wall_and_cost(cell, step, compute, startup, eval_s)
    spreads = calibration.get("spread", {})
    spread = None
    if key:
        spread = spreads.get(_spread_key(cell, key)) or spreads.get(device_model(cell))
    q_tokens = spread["tokens_per_s"] if spread else UNCOVERED[plan.basis]
    q_wall = spread["wall_s"] if spread else UNCOVERED[plan.basis]
    return replace(plan, step_s=step, tokens_per_s=tokens, wall_s=wall, cost_usd=dollars, startup_s=startup,
                   eval_s=eval_s, calibration=describe(cell, calibration, plan.depth),
                   tokens_per_s_range=_range(tokens, q_tokens), wall_s_range=_range(wall, q_wall),
                   cost_usd_range=_range(dollars, q_wall))


def _comparable_memory(cell: CellSpec, plan: planner.CellPlan, row: Any) -> float | None:
    """The plan's memory as the cell's measured peak counts it (`_as_peak`)."""
    if plan.total_gb is None:
        return None
    return _as_peak(cell, plan.total_gb, plan.peak_gb, plan.memory_gb.get("runtime", 0.0), row)


def _planned_memory(cell: CellSpec, plan: dict[str, Any], row: Any) -> float | None:
    """`_comparable_memory` from a plan.csv row."""
    total, peak, runtime = plan.get("gb_per_rank"), plan.get("peak_gb"), plan.get("runtime")
    if _missing(total) or _missing(peak):
        return None
    return _as_peak(cell, float(total), float(peak), 0.0 if _missing(runtime) else float(runtime), row)


def _as_peak(cell: CellSpec, total: float, peak: float, runtime: float, row: Any) -> float:
    """On a GPU CUDA's peak allocated holds no context; on a CPU the resident set's high-water
    mark holds the runtime (the cell's own measured baseline where the table has one) and the
    model's load."""
    if device_model(cell) != "cpu":
        return total - runtime
    baseline = row.get("runtime_baseline_gb")
    return peak - runtime + (runtime if _missing(baseline) else float(baseline))


def planned_vs_measured(rows: pd.DataFrame, calibration: Calibration | None = None,
                        probes: dict[str, Any] | None = None) -> pd.DataFrame:
    """Per measured cell: planned and measured peak memory, tokens/s, wall time and cost, with
    the relative error of each (planned / measured - 1), and whether the measured value fell in
    the planned interval."""
    import pandas as pd

    out = []
    for cell, r in measured(rows):
        plan = predict(as_trained(cell, r), calibration, probe=(probes or {}).get(r["cell_id"]))
        out.append(score(cell, r, plan))
    return pd.DataFrame(out)


def score(cell: CellSpec, r: Any, plan: planner.CellPlan | dict[str, Any]) -> dict[str, Any]:
    """One cell's plan (a CellPlan, or a row of the plan.csv `start` wrote) against its row."""
    get = plan.get if isinstance(plan, dict) else lambda k, d=None: getattr(plan, k, d)
    memory = _comparable_memory(cell, plan, r) if not isinstance(plan, dict) else _planned_memory(cell, plan, r)
    entry = {"cell_id": r["cell_id"], "model": cell.model, "peft": cell.peft, "strategy": cell.strategy,
             "instance": cell.instance, "world_size": cell.world_size, "precision": cell.precision,
             "micro_batch": cell.micro_batch, "basis": get("basis"), "calibration": get("calibration") or ""}
    ranges = {"tokens_per_s": get("tokens_per_s_range"), "wall_s": get("wall_s_range"),
              "cost_usd": get("cost_usd_range")}
    for what, planned, actual in (("mem_gb", memory, r.get("peak_mem_gb")),
                                  ("tokens_per_s", get("tokens_per_s"), r.get("tokens_per_s")),
                                  ("wall_s", get("wall_s"), _as_run(r, "wall_s")),
                                  ("cost_usd", get("cost_usd"), _as_run(r, "cost_usd"))):
        actual = None if _missing(actual) else float(actual)
        planned = None if _missing(planned) else float(planned)
        entry[f"planned_{what}"], entry[f"measured_{what}"] = planned, actual
        entry[f"{what}_error"] = planned / actual - 1 if planned is not None and actual else None
        span = ranges.get(what)
        if span is not None and not any(_missing(x) for x in span) and actual is not None:
            entry[f"{what}_low"], entry[f"{what}_high"] = span
            entry[f"{what}_inside"] = bool(span[0] <= actual <= span[1])
    return entry


def show(calibration: Calibration, scored: pd.DataFrame, out=None) -> None:
    """The fitted overheads and efficiencies, and the calibrated planner against the runs."""
    import sys

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out or sys.stdout, width=200)
    fitted = Table(title="Fitted from the runs: measured step = overhead + slope x first-principles step")
    for col in ("device | instance | strategy | precision | method", "overhead s", "slope", "cells"):
        fitted.add_column(col)
    shapes = [n for key, (_, _, n) in calibration["step"].items() if "|shape=" in key]
    for key, (overhead, slope, n) in sorted(calibration["step"].items()):
        if "|shape=" not in key:
            fitted.add_row(key, f"{overhead:.3g}", f"{slope:.3g}", str(n))
    console.print(fitted)
    if shapes:
        console.print(f"and {len(shapes)} cell shapes measured ({sum(shapes)} cells): a cell of one of them "
                      "is planned from its own measurements")
    if scored.empty:
        return
    table = Table(title="Calibrated plan against the runs (error: planned / measured - 1)")
    for col in ("cell", "planned tokens/s", "measured tokens/s", "error"):
        table.add_column(col)
    for _, r in scored.iterrows():
        err = r["tokens_per_s_error"]
        table.add_row(r["cell_id"], f"{r['planned_tokens_per_s']:,.0f}", f"{r['measured_tokens_per_s']:,.0f}",
                      "-" if pd.isna(err) else f"{err:+.1%}")
    console.print(table)
    errors = scored["tokens_per_s_error"].dropna().abs()
    console.print(f"tokens/s: median |error| {errors.median():.1%} over {len(errors)} cells, "
                  f"largest {errors.max():.1%}")
