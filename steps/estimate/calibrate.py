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

import itertools
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps.estimate import planner, step_time
from steps.estimate.activations import DecoderShape
from steps.plan import catalog
from steps.plan.schema import CellSpec
from steps.plan.settings import leaf_paths, put

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


def read_runs(paths: list[str | Path]) -> pd.DataFrame:
    """The results tables of runs (a run folder or a table file each)."""
    import pandas as pd

    frames = []
    for p in map(Path, paths):
        table = p / "results.parquet" if p.is_dir() else p
        frames.append(pd.read_parquet(table) if table.suffix == ".parquet" else pd.read_csv(table))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _device(cell: CellSpec) -> str:
    entry = catalog.instances().get(cell.instance)
    return entry.accelerator if entry is not None else cell.instance


def _keys(cell: CellSpec) -> list[str]:
    device = _device(cell)
    return [f"{device}|{cell.strategy}|{cell.precision}|{cell.peft}", f"{device}|{cell.strategy}|{cell.precision}",
            f"{device}|{cell.strategy}", device]


def _fill_key(cell: CellSpec) -> str:
    return f"{cell.data.task}|packing={cell.data.packing}|seq={cell.seq_len}"


def measured(rows: pd.DataFrame) -> list[tuple[CellSpec, Any]]:
    """The rows that trained to the end with a step time, as (cell, row)."""
    ok = rows[(rows["outcome"] == "ok") & rows["step_s"].notna() & rows["tokens_per_s"].notna()]
    return [(cell_of_row(r), r) for _, r in ok.iterrows()]


def _ideal_and_comm(cell: CellSpec) -> tuple[float, float] | None:
    """The step's compute seconds at efficiency 1, and its communication seconds on the
    critical path (model splits; data parallelism overlaps it)."""
    arch = planner.arch_of(cell)
    if arch is None:
        return None
    shape = DecoderShape.of(arch)
    counts = planner.counts_of(cell, arch, None)
    total, _ = step_time.step_seconds(cell, shape, counts, dict.fromkeys(step_time.DEFAULT_EFFICIENCY, 1.0))
    if total is None:
        return None
    link = step_time.link_bytes_s(cell)
    comm = step_time.comm_bytes(cell, shape, counts) / link if link and cell.layout.model_split else 0.0
    return total - comm, comm


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(overhead, seconds per ideal second) of a Theil-Sen line through (ideal, measured)
    points: the median of the pairwise slopes and of the intercepts they leave, so that a cell
    slowed by a busy machine moves the fit little. Both kept positive; with one ideal time only,
    a line through the origin."""
    slopes = [(yj - yi) / (xj - xi) for (xi, yi), (xj, yj) in itertools.combinations(points, 2)
              if abs(xj - xi) > 1e-9 * max(xi, xj)]
    slope = statistics.median(slopes) if slopes else 0.0
    if slope > 0:
        overhead = statistics.median(y - slope * x for x, y in points)
        if overhead >= 0:
            return overhead, slope
    return 0.0, statistics.median(y / x for x, y in points)


def fit(rows: pd.DataFrame) -> Calibration:
    """Per key, the per-step overhead and the efficiency (1 / seconds per ideal second) of a
    line through the measured step times against the ideal ones; the median fill per data
    setup."""
    groups: dict[str, list[tuple[float, float]]] = {}
    fills: dict[str, list[float]] = {}
    for cell, r in measured(rows):
        ideal = _ideal_and_comm(cell)
        if ideal is not None and ideal[0] > 0 and float(r["step_s"]) > ideal[1]:
            for key in _keys(cell):
                groups.setdefault(key, []).append((ideal[0], float(r["step_s"]) - ideal[1]))
        slots = cell.global_batch * cell.seq_len
        fills.setdefault(_fill_key(cell), []).append(float(r["tokens_per_s"]) * float(r["step_s"]) / slots)
    lines = {k: _line(v) for k, v in groups.items()}
    return {"efficiency": {k: 1 / slope for k, (_, slope) in lines.items()},
            "overhead_s": {k: overhead for k, (overhead, _) in lines.items()},
            "fill": {k: min(1.0, statistics.median(v)) for k, v in fills.items()}}


def _key_of(cell: CellSpec, calibration: Calibration | None) -> str | None:
    return next((k for k in _keys(cell) if k in (calibration or {}).get("efficiency", {})), None)


def efficiency_of(cell: CellSpec, calibration: Calibration | None) -> dict[str, float] | None:
    """The efficiency table the planner uses for `cell`: the fitted value for its key where
    there is one."""
    key = _key_of(cell, calibration)
    return {**step_time.DEFAULT_EFFICIENCY, cell.strategy: calibration["efficiency"][key]} if key else None


def fill_of(cell: CellSpec, calibration: Calibration | None) -> float:
    return (calibration or {}).get("fill", {}).get(_fill_key(cell), 1.0)


def predict(cell: CellSpec, calibration: Calibration | None, compute: str = "local",
            facts: dict[str, Any] | None = None, fixes: bool = False) -> planner.CellPlan:
    """The planner's answer with the calibration applied (tokens/s in real tokens)."""
    key = _key_of(cell, calibration)
    overhead = calibration["overhead_s"].get(key, 0.0) if key else 0.0
    plan = planner.predict(cell, facts, compute, efficiency_of(cell, calibration), fixes=fixes, overhead_s=overhead)
    if plan.tokens_per_s is not None:
        plan = replace(plan, tokens_per_s=plan.tokens_per_s * fill_of(cell, calibration))
    return plan


def _comparable_memory(cell: CellSpec, plan: planner.CellPlan, row: Any) -> float | None:
    """The plan's memory as the cell's measured peak counts it: on a GPU CUDA's peak allocated
    holds no context; on a CPU the resident set's high-water mark holds the runtime (the cell's
    own measured baseline where the table has one) and the model's load."""
    if plan.total_gb is None:
        return None
    runtime = plan.memory_gb.get("runtime", 0.0)
    baseline = row.get("runtime_baseline_gb")
    if _device(cell) != "cpu":
        return plan.total_gb - runtime
    # The resident set's high-water mark: loading counts too.
    return plan.peak_gb - runtime + (runtime if _missing(baseline) else float(baseline))


def planned_vs_measured(rows: pd.DataFrame, calibration: Calibration | None = None) -> pd.DataFrame:
    """Per measured cell: planned and measured peak memory, tokens/s, wall time and cost, with
    the relative error of each (planned / measured - 1)."""
    import pandas as pd

    out = []
    for cell, r in measured(rows):
        plan = predict(as_trained(cell, r), calibration)
        entry = {"cell_id": r["cell_id"], "model": cell.model, "peft": cell.peft, "strategy": cell.strategy,
                 "instance": cell.instance, "world_size": cell.world_size, "precision": cell.precision,
                 "micro_batch": cell.micro_batch}
        for what, planned, actual in (("mem_gb", _comparable_memory(cell, plan, r), r.get("peak_mem_gb")),
                                      ("tokens_per_s", plan.tokens_per_s, r.get("tokens_per_s")),
                                      ("wall_s", plan.wall_s, _as_run(r, "wall_s")),
                                      ("cost_usd", plan.cost_usd, _as_run(r, "cost_usd"))):
            actual = None if _missing(actual) else float(actual)
            entry[f"planned_{what}"], entry[f"measured_{what}"] = planned, actual
            entry[f"{what}_error"] = planned / actual - 1 if planned is not None and actual else None
        out.append(entry)
    return pd.DataFrame(out)


def show(calibration: Calibration, scored: pd.DataFrame, out=None) -> None:
    """The fitted overheads and efficiencies, and the calibrated planner against the runs."""
    import sys

    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    console = Console(file=out or sys.stdout, width=200)
    fitted = Table(title="Fitted from the runs: per-step overhead and efficiency (MFU at the catalog peak)")
    for col in ("device | strategy | precision | method", "overhead s", "efficiency"):
        fitted.add_column(col)
    for key, eff in sorted(calibration["efficiency"].items()):
        fitted.add_row(key, f"{calibration['overhead_s'][key]:.3g}", f"{eff:.3g}")
    console.print(fitted)
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
