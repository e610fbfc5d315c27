"""DeepSpeed ZeRO stages 1-3, and stage 3 with optimizer and parameters offloaded to CPU.

Launched by torchrun like every cell (DeepSpeed joins the existing process group). The
optimizer is PyTorch's, handed to DeepSpeed, so no DeepSpeed op has to be compiled.
"""

from __future__ import annotations

from typing import Any

import torch

from steps.distributed import Dist
from steps.parallel.engine import Engine, Layout, token_loss_sum
from steps.schema import CellSpec

STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}


def deepspeed_config(cell: CellSpec, hidden_size: int | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": STAGES[cell.strategy]}
    if hidden_size:
        # Buckets sized to the model, as transformers' "auto" does: DeepSpeed's defaults
        # (5e8 elements, a 2 GB fp32 buffer) dwarf a small model and break a memory cap.
        h2 = hidden_size * hidden_size
        zero["reduce_bucket_size"] = h2
        if STAGES[cell.strategy] == 3:
            zero.update(stage3_prefetch_bucket_size=int(0.9 * h2), stage3_param_persistence_threshold=10 * hidden_size)
    if cell.strategy == "zero3_offload":
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
    if cell.train.max_grad_norm:
        config["gradient_clipping"] = cell.train.max_grad_norm
    if cell.precision in ("bf16-mixed", "bf16-true"):
        config["bf16"] = {"enabled": True}
    elif cell.precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


class ZeroEngine(Engine):
    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, total_steps: int):
        import deepspeed

        # PyTorch's optimizer and schedule, as every engine builds them, handed to DeepSpeed.
        super().__init__(cell, d, model, Layout(d.rank, d.world, True), total_steps)
        self.module, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler,
            model_parameters=self.params, dist_init_required=False,
            config=deepspeed_config(cell, getattr(getattr(model, "config", None), "hidden_size", None)),
        )
        self.scaler = None  # DeepSpeed scales fp16 losses itself

    def lr(self) -> float:
        return self.module.get_lr()[0]

    def forward(self, batch):
        # DeepSpeed casts to bf16/fp16 itself when its precision is enabled.
        return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def forward_backward(self, micro, scale):
        total = 0.0
        for batch in micro:
            loss = token_loss_sum(self.forward(batch), batch["labels"])
            # The loop already scales for accumulation and replicas; DeepSpeed must not again.
            self.module.backward(loss * scale, scale_wrt_gas=False)
            self.module.step()  # an optimizer step only at the accumulation boundary
            total += loss.item()
        return total

    def optimizer_step(self) -> None:
        """DeepSpeed stepped (clipping included) at the last micro-batch's `step()`."""

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def full_trainable_state(self):
        import deepspeed

        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().to("cpu", copy=True) for n, p in named}
