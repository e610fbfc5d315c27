"""The cheapest change that makes a cell that will not fit fit: the changes that cut memory,
each described as the user would set it, planned and compared by predicted cost; no torch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steps.plan import catalog, compat
from steps.plan.schema import CellSpec


def candidates(cell: CellSpec) -> list[tuple[str, CellSpec]]:
    """Changes that cut a cell's memory: a smaller micro-batch with more accumulation, gradient
    checkpointing, QLoRA, ZeRO-3, offload, more GPUs (and those with checkpointing)."""
    def changed(**kw) -> CellSpec:
        return cell.model_copy(update=kw)

    out: list[tuple[str, CellSpec]] = []
    checkpointed = cell.train.model_copy(update={"gradient_checkpointing": True})
    mb, ga = cell.micro_batch, cell.grad_accum
    while mb > 1:
        mb, ga = max(1, mb // 2), ga * 2
        out.append((f"micro_batch {mb} x grad_accum {ga}", changed(micro_batch=mb, grad_accum=ga)))
    if not cell.train.gradient_checkpointing:
        out.append(("gradient_checkpointing", changed(train=checkpointed)))
        if cell.micro_batch > 1:
            out.append((f"gradient_checkpointing, micro_batch 1 x grad_accum {cell.micro_batch * cell.grad_accum}",
                        changed(train=checkpointed, micro_batch=1, grad_accum=cell.micro_batch * cell.grad_accum)))
    if cell.peft in ("lora", "dora"):
        out.append(("peft qlora", changed(peft="qlora")))
    entry = catalog.instances().get(cell.instance)
    if cell.world_size > 1 and cell.strategy in ("ddp", "zero1", "zero2", "fsdp"):
        out.append(("strategy zero3", changed(strategy="zero3")))
    if cell.world_size > 1 and cell.strategy != "zero3_offload" and cell.layout.model_split is None:
        out.append(("strategy zero3_offload", changed(strategy="zero3_offload")))
    per_node = entry.devices_per_node if entry is not None else 0
    gpus = cell.gpus * 2
    while per_node and gpus <= per_node:
        strategy = "fsdp" if cell.strategy in ("single", "ddp") else cell.strategy
        out.append((f"strategy {strategy} on {gpus} GPUs", changed(strategy=strategy, gpus=gpus)))
        gpus *= 2
    if not cell.train.gradient_checkpointing:  # sharding and checkpointing together
        out += [(f"{label}, gradient_checkpointing", c.model_copy(update={"train": checkpointed}))
                for label, c in list(out) if label.startswith("strategy")]
    return out


def cheapest_fix(cell: CellSpec, predict: Callable[[CellSpec], Any]) -> str | None:
    """The change, among `candidates`, that fits at the least predicted cost (time where cost
    is unknown); None if none does. `predict`: the planner for one changed cell (its plan's
    `verdict`, `cost_usd`, `wall_s`), without fixes of its own."""
    best: tuple[float, str] | None = None
    for label, changed in candidates(cell):
        if compat.refusal(changed):
            continue
        plan = predict(changed)
        if plan.verdict not in ("fits", "tight"):
            continue
        score = plan.cost_usd if plan.cost_usd is not None else plan.wall_s if plan.wall_s is not None else 0.0
        if best is None or score < best[0]:
            best = (score, label)
    return best[1] if best else None
