"""The optimizer and learning-rate schedule, built the same way by every engine (DeepSpeed
is handed them too), so that strategies differ only in how they run a step."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from steps.plan.schema import CellSpec


def fused(cell: CellSpec, params: list[torch.nn.Parameter]) -> bool:
    """Whether PyTorch's fused optimizer kernel runs: `on`, or `auto` with the parameters on CUDA."""
    setting = cell.train.fused_optimizer
    if cell.train.optimizer == "paged_adamw_8bit" or setting == "off":
        return False
    return setting == "on" or (bool(params) and all(p.device.type == "cuda" for p in params))


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    """Sharded (DTensor) and plain parameters in groups of their own: a fused kernel takes one
    group's tensors in one call, and cannot mix the two (tensor parallelism has both)."""
    from torch.distributed.tensor import DTensor

    kinds = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [{"params": k} for k in kinds if k] or [{"params": []}]


def build_optimizer(params: list[torch.nn.Parameter], cell: CellSpec) -> torch.optim.Optimizer:
    t = cell.train
    on = fused(cell, params)
    if on:
        params = _groups(params)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cell.lr, weight_decay=t.weight_decay, fused=on or None)
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cell.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=cell.lr, weight_decay=t.weight_decay, fused=on or None)


def lr_lambda(cell: CellSpec, total_steps: int) -> Callable[[int], float]:
    """The factor of `cell.lr` at each step: a linear warm-up, then constant, cosine or linear
    decay to zero at `total_steps`."""
    warmup, kind = cell.train.lr_warmup_steps, cell.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cell: CellSpec,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cell, total_steps))
