"""Every `train.*` and `data.*` setting by its dotted name (`train.lora.r`, `data.packing`).

The same names are sweep keys and exclude keys in a matrix, and columns of the results table,
so a setting is written one way from the YAML to a pandas filter.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from typing import Any

from pydantic import BaseModel

from steps.plan.schema import DataSettings, TrainSettings, near_key

SECTIONS: dict[str, type[BaseModel]] = {"train": TrainSettings, "data": DataSettings}
# How a cell is run, not what it measures: kept out of its id and of "the same configuration".
RUN_LIMITS = ("train.timeout_s", "train.hang_after_s", "train.eval_every", "train.launcher",
              "train.diverge_factor", "train.stop_after_steps")


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The settings model a field holds (`LoraSettings`, `FaultSettings | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _walk(model: type[BaseModel], prefix: str) -> list[tuple[str, type[BaseModel] | None]]:
    out = []
    for name, field in model.model_fields.items():
        path, sub = f"{prefix}.{name}", _submodel(field.annotation)
        out.append((path, sub))
        if sub is not None:
            out += _walk(sub, path)
    return out


@functools.cache
def _paths() -> tuple[tuple[str, type[BaseModel] | None], ...]:
    return tuple((path, sub) for section, model in SECTIONS.items() for path, sub in _walk(model, section))


def all_paths() -> dict[str, type[BaseModel] | None]:
    """Every setting that can be named: leaves and sections (`train.lora`), with the section's model."""
    return dict(_paths())


def leaf_paths() -> list[str]:
    """Settings that hold one value (the results table's setting columns), in schema order (the
    schema is walked once: a 1,000-cell plan asks 2,000 times)."""
    return [path for path, sub in _paths() if sub is None]


def unknown_path_problem(path: str) -> str | None:
    """Why `path` names no setting, with the keys allowed where it goes wrong."""
    known, parts = all_paths(), path.split(".")
    if path in known:
        return None
    if parts[0] not in SECTIONS or len(parts) == 1:
        return "unknown setting: a setting's name starts with train. or data. (e.g. train.lora.r)"
    level, model = parts[0], SECTIONS[parts[0]]
    for i, part in enumerate(parts[1:], 1):
        here = f"{level}.{part}"
        if here not in known:
            allowed = sorted(model.model_fields)
            near = near_key(part, allowed)
            hint = f" (did you mean '{level}.{near[0]}'?)" if near else ""
            return f"unknown setting{hint}; allowed keys in {level}: {', '.join(allowed)}"
        if known[here] is None:
            return f"{here} is one setting; it has no '{'.'.join(parts[i + 1:])}'"
        level, model = here, known[here]
    return None


def get(sections: dict[str, Any], path: str) -> Any:
    """The value at a dotted path of {"train": {...}, "data": {...}} (None where a section is None)."""
    value: Any = sections
    for part in path.split("."):
        if value is None:
            return None
        value = value[part]
    return value


def put(sections: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `sections` with `value` at `path` (a mapping is merged into a section)."""
    head, _, rest = path.partition(".")
    out = dict(sections)
    if not rest:
        out[head] = merge(out[head], value) if isinstance(value, dict) and isinstance(out.get(head), dict) else value
    else:
        out[head] = put(out.get(head) or {}, rest, value)
    return out


def merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` over `base`, key by key into nested mappings."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def column_value(value: Any) -> Any:
    """A setting as a table cell: lists as JSON text, so that columns stay comparable."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


def flatten(cell: BaseModel) -> dict[str, Any]:
    """Every leaf setting of a cell (its train and data sections) by dotted name."""
    sections = cell.model_dump(mode="json", include=set(SECTIONS))
    return {path: column_value(get(sections, path)) for path in leaf_paths()}


CONTENDED_SHARE = 0.25
"""A cell whose cores other processes kept busy more than this share of the timed steps
(`other_cpu_share`) measured the contention as much as itself: a quarter of a core's time taken
slows a compute-bound step by about as much, far above the 2% speed noise the report resolves.
The report flags such cells and the calibration store does not fit from them."""


def contended(share: Any) -> bool:
    """Whether a cell's `other_cpu_share` says it ran on a busy machine (unmeasured: no)."""
    try:
        return float(share) > CONTENDED_SHARE
    except (TypeError, ValueError):
        return False
