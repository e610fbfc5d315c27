"""Combinations that cannot run, refused before launch with the reason and what to run instead.

Each rule returns a reason or None. Keep this list short: refuse only what truly cannot work
(the README's compatibility table mirrors it).
"""

from __future__ import annotations

from collections.abc import Callable

from steps.schema import CellSpec

# What the trainer implements in this version; the rest of the schema's names are refused.
IMPLEMENTED_PEFT = {"full", "lora", "qlora", "dora"}
IMPLEMENTED_STRATEGIES = {"single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload",
                          "tensor", "pipeline", "hybrid"}


def _implemented(cell: CellSpec) -> str | None:
    if cell.peft not in IMPLEMENTED_PEFT:
        return f"peft {cell.peft!r} is not implemented yet; use lora"
    if cell.strategy not in IMPLEMENTED_STRATEGIES:
        return f"strategy {cell.strategy!r} is not implemented yet; use ddp"
    return None


def _multinode_local(cell: CellSpec) -> str | None:
    if cell.nodes > 1 and cell.instance == "local-cpu":
        return "nodes > 1 needs remote compute; on local-cpu use nodes: 1 with gpus: N processes"
    return None


RULES: list[Callable[[CellSpec], str | None]] = [_implemented, _multinode_local]


def refusal(cell: CellSpec) -> str | None:
    for rule in RULES:
        if reason := rule(cell):
            return reason
    return None
