"""`economy:` planned: which member of each equivalence class trains to the end (the one the
planner predicts cheapest among those that fit), the speed cells around it, and what the run
is predicted to cost against training every cell to the end; no torch."""

from __future__ import annotations

from dataclasses import dataclass
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
        short = [c for c in cells if full_steps.get(c.cell_id) is not None
                 and full_steps[c.cell_id] > economy.speed_steps]
        if economy.quality == "every" or len(cells) == 1 or len(short) < len(cells):
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
    """The run's predicted training seconds, device-seconds and cost, economy against full."""

    quality_runs: int
    speed_cells: int
    train_s: float | None  # summed over cells: what this run trains
    full_train_s: float | None  # the same matrix with every cell trained to the end
    wall_s: float | None  # with each cell's start-up
    full_wall_s: float | None
    device_s: float | None
    full_device_s: float | None
    cost_usd: float | None
    full_cost_usd: float | None

    @property
    def ratio(self) -> float | None:
        """Training time of this run over that of the full run."""
        return self.train_s / self.full_train_s if self.train_s is not None and self.full_train_s else None


def saving(planned: list[PlannedCell], plans: dict[str, CellPlan], startup_s: dict[str, float],
           rates: dict[str, float | None]) -> Saving:
    """Predicted from the planner's step times: a speed cell trains `speed_steps` of them, a
    quality cell (or any cell without economy) its full steps. `startup_s`, `rates`: per cell,
    the start-up seconds and the price per hour of its instances."""
    sums: dict[str, float | None] = dict.fromkeys(("train", "full_train", "wall", "full_wall", "device",
                                                   "full_device", "cost", "full_cost"), 0.0)

    def add(key: str, value: float | None) -> None:
        sums[key] = None if value is None or sums[key] is None else sums[key] + value

    for p in planned:
        plan = plans.get(p.cell.cell_id)
        if p.refused or plan is None or plan.verdict == "will not fit":
            continue
        step, full = plan.step_s, plan.steps
        steps = p.speed_steps if p.role == "speed" else full
        ran = step * steps if step is not None and steps is not None else None
        whole = step * full if step is not None and full is not None else None
        devices, start, rate = p.cell.world_size, startup_s.get(p.cell.cell_id, 0.0), rates.get(p.cell.cell_id)
        add("train", ran)
        add("full_train", whole)
        for key, seconds in (("", ran), ("full_", whole)):
            wall = None if seconds is None else seconds + start
            add(f"{key}wall", wall)
            add(f"{key}device", None if wall is None else wall * devices)
            add(f"{key}cost", None if wall is None or rate is None else wall / 3600 * rate)
    return Saving(sum(p.role == "quality" and bool(p.quality_class) for p in planned),
                  sum(p.role == "speed" for p in planned), sums["train"], sums["full_train"], sums["wall"],
                  sums["full_wall"], sums["device"],
                  sums["full_device"], sums["cost"], sums["full_cost"])


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
