"""How much money: a cell's steps, wall time (steps x step time + start-up) and cost at the
catalog's price (SageMaker's under `compute: sagemaker`, the cluster's own GPU-hour rate under
`compute: slurm`, else unknown); no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass

from steps.plan import catalog
from steps.plan.schema import CellSpec, MatrixSpec

STARTUP_S = {"gpu": 60.0, "cpu": 10.0}  # process start, model load, rendezvous


def steps_of(cell: CellSpec) -> int | None:
    """Optimizer steps the cell trains: `max_steps`, or its epochs over `train_samples`; no more
    than `stop_after_steps` (a speed cell's, under `economy:`)."""
    t = cell.train
    if t.epochs is None:
        n = t.max_steps
    elif cell.data.train_samples is None:
        return None
    else:
        n = math.ceil(t.epochs * cell.data.train_samples / cell.global_batch)
    return min(n, t.stop_after_steps) if t.stop_after_steps is not None else n


@dataclass(frozen=True)
class Pricing:
    """Where the cells run, as far as their price goes: a compute's name is enough except on a
    Slurm cluster, whose rate is its own (`remote.price_per_gpu_hour`), not a cloud's."""

    compute: str = "local"
    gpu_hour_usd: float | None = None

    @classmethod
    def of(cls, spec: MatrixSpec) -> Pricing:
        return cls(spec.compute, spec.remote.price_per_gpu_hour if spec.compute == "slurm" else None)


Compute = str | Pricing  # what the planning functions take as `compute`


def hourly_usd(cell: CellSpec, compute: Compute = "local") -> float | None:
    """What the cell's instances cost per hour: per device for local CPU types, per node else;
    on Slurm, the cluster's rate for each of the cell's devices (None without one)."""
    pricing = compute if isinstance(compute, Pricing) else Pricing(compute)
    compute = pricing.compute
    if compute == "slurm":
        return pricing.gpu_hour_usd * cell.world_size if pricing.gpu_hour_usd is not None else None
    entry = catalog.instances().get(cell.instance)
    if entry is None:
        return None
    rate = entry.sagemaker_price_per_hour_usd if compute == "sagemaker" else entry.price_per_hour_usd
    if rate is None:
        return None
    return rate * (cell.world_size if entry.price_per == "device" else cell.nodes)


def wall_and_cost(cell: CellSpec, step_s: float, compute: Compute = "local", startup_s: float | None = None,
                  eval_s: float = 0.0) -> tuple[int | None, float | None, float | None]:
    """(steps, wall seconds, dollars) of the whole cell at `step_s` per step, after `startup_s`
    (the catalog's typical start-up where not measured) and with `eval_s` of evaluations; None
    where the step count or the price is unknown."""
    n = steps_of(cell)
    startup = STARTUP_S[catalog.device_kind(cell.instance)] if startup_s is None else startup_s
    wall = n * step_s + startup + eval_s if n is not None else None
    rate = hourly_usd(cell, compute)
    return n, wall, wall / 3600 * rate if wall is not None and rate is not None else None
