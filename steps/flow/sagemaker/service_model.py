"""Every request to AWS checked against botocore's own service model, all rules at once.

botocore's client checks types, required members and minimums; the service itself also
enforces name patterns, enumerations (the instance type), maximum lengths and counts
(hyperparameters, environment, tags). A request that breaks one of those would be refused by
AWS only after the source upload; here it is refused before anything is sent, with every
problem listed (path, bad value, the rule).
"""

from __future__ import annotations

import functools
from typing import Any

import botocore.session
import regex  # AWS patterns use Unicode classes (\p{L}) that `re` lacks
from botocore.model import ListShape, MapShape, Shape, StructureShape


@functools.cache
def _service(service: str):
    return botocore.session.get_session().get_service_model(service)


def input_shape(service: str, operation: str) -> StructureShape:
    return _service(service).operation_model(operation).input_shape


def request_problems(service: str, operation: str, params: dict[str, Any]) -> list[str]:
    """Why AWS would refuse `params` for `operation` (empty when it would not)."""
    problems: list[str] = []
    _check(input_shape(service, operation), params, operation, problems)
    return problems


def _check(shape: Shape, value: Any, path: str, out: list[str]) -> None:
    if isinstance(shape, StructureShape):
        if not isinstance(value, dict):
            out.append(f"{path}: expected a structure, got {type(value).__name__}")
            return
        for name in shape.required_members:
            if name not in value:
                out.append(f"{path}.{name}: required member is missing")
        for name, member in value.items():
            if name not in shape.members:
                out.append(f"{path}.{name}: unknown member; allowed: {', '.join(shape.members)}")
            elif member is not None:
                _check(shape.members[name], member, f"{path}.{name}", out)
    elif isinstance(shape, ListShape):
        if not isinstance(value, (list, tuple)):
            out.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        _count(shape, len(value), path, out)
        for i, item in enumerate(value):
            _check(shape.member, item, f"{path}[{i}]", out)
    elif isinstance(shape, MapShape):
        if not isinstance(value, dict):
            out.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        _count(shape, len(value), path, out)
        for key, item in value.items():
            _check(shape.key, key, f"{path} key {key!r}", out)
            _check(shape.value, item, f"{path}[{key!r}]", out)
    elif shape.type_name == "string":
        _string(shape, value, path, out)
    elif shape.type_name in ("integer", "long"):
        if not isinstance(value, int) or isinstance(value, bool):
            out.append(f"{path}: {value!r} is not an integer")
            return
        rules = shape.metadata
        if "min" in rules and value < rules["min"]:
            out.append(f"{path}: {value} is below the minimum {rules['min']}")
        if "max" in rules and value > rules["max"]:
            out.append(f"{path}: {value} is above the maximum {rules['max']}")
    elif shape.type_name == "boolean" and not isinstance(value, bool):
        out.append(f"{path}: {value!r} is not a boolean")


def _count(shape: Shape, n: int, path: str, out: list[str]) -> None:
    rules = shape.metadata
    if "min" in rules and n < rules["min"]:
        out.append(f"{path}: {n} entries, at least {rules['min']} required")
    if "max" in rules and n > rules["max"]:
        out.append(f"{path}: {n} entries, at most {rules['max']} allowed")


def _string(shape: Shape, value: Any, path: str, out: list[str]) -> None:
    if not isinstance(value, str):
        out.append(f"{path}: {value!r} is not a string")
        return
    rules, shown = shape.metadata, value if len(value) <= 80 else value[:77] + "..."
    if shape.enum and value not in shape.enum:
        near = [e for e in shape.enum if e.startswith(value.rsplit(".", 1)[0])][:8]
        hint = f"; close: {', '.join(near)}" if near else f"; {len(shape.enum)} allowed values"
        out.append(f"{path}: {shown!r} is not an allowed value{hint}")
    if "min" in rules and len(value) < rules["min"]:
        out.append(f"{path}: {shown!r} is shorter than {rules['min']} characters")
    if "max" in rules and len(value) > rules["max"]:
        out.append(f"{path}: {len(value)} characters, at most {rules['max']} allowed")
    pattern = rules.get("pattern")
    if pattern and regex.fullmatch(pattern, value, flags=regex.DOTALL) is None:
        out.append(f"{path}: {shown!r} does not match the pattern {pattern}")
