"""ddp and fsdp: every rank holds (a shard of) the whole model and trains its own samples.
(single is the base engine itself.)"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from steps.plan.schema import CellSpec
from steps.trainer.distributed import Dist
from steps.trainer.engines.base import Engine, ModelFacts


class DDPEngine(Engine):
    """The model wrapped in DistributedDataParallel, which averages gradients during backward."""

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts, total_steps: int):
        super().__init__(cell, d, model, facts, total_steps)
        self.module = DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.module.no_sync()


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a (possibly peft-wrapped) causal LM."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = inner
        try:
            for attr in path.split("."):
                obj = getattr(obj, attr)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"cannot find the decoder layers of {type(inner).__name__}")


class FSDPEngine(Engine):
    """FSDP2 (`fully_shard`): each decoder layer is a unit, then the root.

    4-bit base weights (QLoRA) stay whole on every rank (`ignored_params`): they are frozen and
    already a quarter of their bf16 size, and bitsandbytes' packed parameters cannot be split.
    """

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts, total_steps: int):
        from torch.distributed.fsdp import fully_shard

        ignored = {p for p in model.parameters() if type(p).__name__ == "Params4bit"} or None
        for layer in decoder_layers(model):
            fully_shard(layer, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)
        # The optimizer is built on the sharded parameters.
        super().__init__(cell, d, model, facts, total_steps)

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
