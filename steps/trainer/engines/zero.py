"""DeepSpeed ZeRO stages 1-3, and stage 3 with optimizer and parameters offloaded to CPU.

Launched by torchrun like every cell (DeepSpeed joins the existing process group). The
optimizer is PyTorch's, handed to DeepSpeed (offloaded too: `zero_force_ds_cpu_optimizer` off),
so no DeepSpeed op has to be compiled: not CPU Adam, and not the inference-only ops below.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from steps.plan.schema import CellSpec
from steps.trainer.distributed import Dist
from steps.trainer.engines.base import Engine, ModelFacts


def deepspeed_config(cell: CellSpec, hidden_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed's configuration of a cell (starts nothing: DeepSpeed is not imported)."""
    stage = cell.layout.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    if hidden_size:
        # Buckets sized to the model, as transformers' "auto" does: DeepSpeed's defaults
        # (5e8 elements, a 2 GB fp32 buffer) dwarf a small model and break a memory cap.
        h2 = hidden_size * hidden_size
        zero["reduce_bucket_size"] = h2
        if stage == 3:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * h2), stage3_param_persistence_threshold=10 * hidden_size)
    if cell.layout.offloaded:
        zero.update(offload_optimizer={"device": "cpu", "pin_memory": False},
                    offload_param={"device": "cpu", "pin_memory": False})
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cell.micro_batch,
        "gradient_accumulation_steps": cell.grad_accum,
        "train_batch_size": cell.global_batch,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # Always said: DeepSpeed clips at 1.0 when the key is absent (GRADIENT_CLIPPING_DEFAULT), so
    # `max_grad_norm: null` must be 0.0 (off) here, or ZeRO cells clip where no other cell does.
    config["gradient_clipping"] = cell.train.max_grad_norm or 0.0
    if cell.precision in ("bf16-mixed", "bf16-true"):
        config["bf16"] = {"enabled": True}
    elif cell.precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


# DeepSpeed's backend compiles this op on first use (about a minute of C++ per machine and
# PyTorch install, on CPU): a shared-memory all-reduce that only `inference_all_reduce` calls,
# for DeepSpeed inference. ZeRO's collectives go through torch.distributed.
INFERENCE_ONLY_OPS = ("deepspeed_shm_comm",)


def skip_inference_only_ops() -> None:
    """Mark DeepSpeed's inference-only ops incompatible, so that joining the process group does
    not build them (DeepSpeed reads this table before it builds an op)."""
    import deepspeed.ops

    for name in INFERENCE_ONLY_OPS:
        deepspeed.ops.__compatible_ops__[name] = False


class ZeroEngine(Engine):
    """The base engine's step with DeepSpeed's engine as `module`: it averages and shards the
    gradients, steps (clipping included) at the accumulation boundary and scales fp16 losses."""

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts, total_steps: int):
        import deepspeed

        skip_inference_only_ops()
        # PyTorch's optimizer and schedule, as every engine builds them, handed to DeepSpeed.
        super().__init__(cell, d, model, facts, total_steps)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            model_parameters=self.params, dist_init_required=False,
            config=deepspeed_config(cell, getattr(facts.config, "hidden_size", None)),
        )
        self.scaler = None  # DeepSpeed scales fp16 losses itself

    def lr(self) -> float:
        return self.module.get_lr()[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        """DeepSpeed casts to bf16/fp16 itself when its precision is enabled."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already scales for accumulation and replicas; DeepSpeed must not again.
        self.module.backward(loss, scale_wrt_gas=False)
        self.module.step()  # an optimizer step only at the accumulation boundary

    def optimizer_step(self) -> None:
        """DeepSpeed stepped (clipping included) at the last micro-batch's `step()`."""

    def save_state(self, folder: Path) -> dict[str, Any]:
        """DeepSpeed's own checkpoint, which holds the scheduler and loss scale too."""
        self.module.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True)
        return {"scheduler": None, "scaler": None}

    def load_state(self, folder: Path, own: dict[str, Any]) -> None:
        self.module.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=True)

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        import deepspeed

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
