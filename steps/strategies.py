"""Parallel strategies: how a model is wrapped so that ranks share the work.

Each strategy gives the loop the same small surface: the module to call, and a context that
skips gradient synchronisation on the micro-batches before the last of an accumulation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel

from steps.distributed import Dist
from steps.schema import CellSpec


@dataclass
class Wrapped:
    module: torch.nn.Module
    no_sync: Callable[[], ContextManager]


def wrap(model: torch.nn.Module, cell: CellSpec, d: Dist) -> Wrapped:
    if cell.strategy == "single" or d.world == 1 and cell.strategy != "ddp":
        return Wrapped(model, contextlib.nullcontext)
    if cell.strategy == "ddp":
        ddp = DistributedDataParallel(
            model,
            device_ids=[d.device.index] if d.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        return Wrapped(ddp, ddp.no_sync)
    raise ValueError(f"strategy {cell.strategy!r} is not implemented")
