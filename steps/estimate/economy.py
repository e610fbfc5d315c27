"""`economy:` planned: which member of each equivalence class trains to the end (the one the
planner predicts cheapest among those that fit), the speed cells around it, and what the run
is predicted to cost against training every cell to the end; no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from steps.estimate.planner import CellPlan
from steps.plan import equivalence
from steps.plan.schema import EconomySettings, PlannedCell


def _price(plan: CellPlan | None) -> tuple[int, float]:
    """Sort key of a candidate quality run: fitting first, then predicted cost (wall time where
    the price is unknown, last where both are)."""
    if plan is None:
        return (2, 0.0)
    unfit = plan.verdict == "will not fit"
    value = plan.cost_usd if plan.cost_usd is not None else plan.wall_s
    return (1 if unfit else 0, float("inf") if value is None else value)


def assign(planned: list[PlannedCell], plans: dict[str, CellPlan], economy: EconomySettings | None,
           full_steps: dict[str, int | None]) -> list[PlannedCell]:
    """Each running cell's role. `full_steps`: the steps each cell trains to the end (None
    where unknown: such a cell trains for itself). A class of one, and a cell whose full run is
    no longer than `speed_steps`, trains to the end for itself."""
    if economy is None:
        return planned
    running = [p for p in planned if not p.refused]
    members = equivalence.classes([p.cell for p in running])
    roles: dict[str, PlannedCell] = {}
    for key, cells in members.items():
        long_enough = [c for c in cells if full_steps.get(c.cell_id) is not None
                       and full_steps[c.cell_id] > economy.speed_steps]
        if economy.quality == "every" or len(cells) == 1 or len(long_enough) < len(cells):
            for c in cells:
                roles[c.cell_id] = PlannedCell(c, role="quality", quality_class=key)
            continue
        best = min(cells, key=lambda c: _price(plans.get(c.cell_id)))  # ties: matrix order
        for c in cells:
            speed = c.cell_id != best.cell_id
            roles[c.cell_id] = PlannedCell(
                c, role="speed" if speed else "quality", quality_class=key,
                quality_from=best.cell_id if speed else None,
                speed_steps=economy.speed_steps if speed else None,
                evaluate_speed=economy.evaluate_speed_cells and speed)
    return [roles.get(p.cell.cell_id, p) if not p.refused else p for p in planned]


@dataclass(frozen=True)
class Saving:
    """The run's predicted training seconds, wall and device seconds and cost, economy against
    every cell trained to the end."""

    quality_runs: int
    speed_cells: int
    train_s: float | None  # summed over cells: what this run trains
    full_train_s: float | None  # the same matrix with every cell trained to the end
    wall_s: float | None  # with each cell's start-up
    device_s: float | None
    full_device_s: float | None
    cost_usd: float | None
    full_cost_usd: float | None

    @property
    def ratio(self) -> float | None:
        """Training time of this run over that of the full run."""
        return self.train_s / self.full_train_s if self.train_s is not None and self.full_train_s else None

    def to_dict(self) -> dict[str, Any]:
        """As plain data (the run's provenance keeps it), the ratio included."""
        return {**asdict(self), "ratio": self.ratio}


def _total(values: list[float | None]) -> float | None:
    """A sum that is unknown where any part is."""
    return None if any(v is None for v in values) else sum(values)


def saving(planned: list[PlannedCell], plans: dict[str, CellPlan]) -> Saving:
    """From each fitting cell's plan: the full run is its wall time and cost as planned; a
    speed cell leaves out the steps after its `speed_steps` (its price is per second)."""
    rows = []  # (train, full train, wall, full wall, cost, full cost, devices) per cell
    for p in planned:
        plan = plans.get(p.cell.cell_id)
        if p.refused or plan is None or plan.verdict == "will not fit":
            continue
        step, full = plan.step_s, plan.steps
        whole = step * full if step is not None and full is not None else None
        ran = step * p.speed_steps if p.role == "speed" and step is not None else whole
        wall = (None if plan.wall_s is None or ran is None or whole is None
                else plan.wall_s - whole + ran)
        dollars = (plan.cost_usd if p.role != "speed" else
                   None if plan.cost_usd is None or wall is None or not plan.wall_s
                   else plan.cost_usd * wall / plan.wall_s)
        rows.append((ran, whole, wall, plan.wall_s, dollars, plan.cost_usd, p.cell.world_size))
    train, full_train, wall, full_wall, dollars, full_dollars = (_total([r[i] for r in rows]) for i in range(6))
    device = _total([None if r[2] is None else r[2] * r[6] for r in rows])
    full_device = _total([None if r[3] is None else r[3] * r[6] for r in rows])
    return Saving(sum(p.role == "quality" for p in planned), sum(p.role == "speed" for p in planned),
                  train, full_train, wall, device, full_device, dollars, full_dollars)


def summary(planned: list[PlannedCell]) -> list[dict[str, Any]]:
    """One entry per class: its key, what it shares, its quality run and its speed cells."""
    out: dict[str, dict[str, Any]] = {}
    for p in planned:
        if p.refused or p.role is None:
            continue
        entry = out.setdefault(p.quality_class, {"class": p.quality_class, "what": equivalence.describe(p.cell),
                                                 "quality": [], "speed": []})
        entry["quality" if p.role == "quality" else "speed"].append(p.cell.cell_id)
    return list(out.values())
