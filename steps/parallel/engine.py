"""What the training loop asks of a parallel strategy, and the plain implementation of it.

The loop hands an engine the micro-batches of one optimizer step and a loss scale; the engine
runs forward and backward its own way (DDP, FSDP, DeepSpeed, a tensor-parallel model, a
pipeline schedule) and returns this rank's share of the summed loss. Shares add up over ranks
to the global sum: ranks that hold a copy of another rank's result (tensor-parallel peers,
early pipeline stages) report zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

from steps import modeling
from steps.data import IGNORE
from steps.distributed import Dist
from steps.schema import CellSpec


@dataclass(frozen=True)
class Layout:
    dp_rank: int  # which data-parallel replica this rank belongs to
    dp_size: int
    reports: bool  # this rank's loss and token counts go into the global sums


def autocast(cell: CellSpec, device: torch.device) -> ContextManager:
    if cell.precision not in ("bf16-mixed", "fp16-mixed"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=modeling.compute_dtype(cell))


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over target tokens (labels are already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def eval_counts(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> list[float]:
    """[loss sum, target tokens, correct tokens, exact answers, answered sequences].

    An answer is exact when every target token but the closing eos is the argmax (teacher
    forcing, which equals greedy decoding of the answer).
    """
    target = labels != IGNORE
    hit = (logits.argmax(-1) == labels) & target
    answer = target & (labels != eos_id)
    answered = answer.any(1)
    exact = ((hit | ~answer).all(1) & answered).sum()
    return [token_loss_sum(logits, labels).item(), target.sum().item(), hit.sum().item(),
            exact.item(), answered.sum().item()]


def build_optimizer(params: list[torch.nn.Parameter], cell: CellSpec) -> torch.optim.Optimizer:
    t = cell.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cell.lr, weight_decay=t.weight_decay)
    if t.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=cell.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=cell.lr, weight_decay=t.weight_decay)


def lr_lambda(cell: CellSpec, total_steps: int) -> Callable[[int], float]:
    warmup, kind = cell.train.lr_warmup_steps, cell.train.lr_schedule

    def factor(step: int) -> float:
        import math

        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress

    return factor


class Engine:
    """Every rank computes full logits for its own micro-batches (single, ddp, fsdp, tensor).

    Subclasses set `module` (what to call) and `no_sync` (skips gradient synchronisation on
    the micro-batches before the last of an accumulation).
    """

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, layout: Layout,
                 total_steps: int):
        self.cell, self.d, self.model, self.layout = cell, d, model, layout
        self.module: torch.nn.Module = model
        self.peft_model = model if hasattr(model, "peft_config") else None  # for saving the adapter
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cell)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cell, total_steps))
        self.scaler = torch.amp.GradScaler(d.device.type) if cell.precision == "fp16-mixed" else None

    def no_sync(self) -> ContextManager:
        return contextlib.nullcontext()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.cell, self.d.device):
            return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def forward_backward(self, micro: list[dict[str, torch.Tensor]], scale: float) -> float:
        total = 0.0
        for k, batch in enumerate(micro):
            with contextlib.nullcontext() if k == len(micro) - 1 else self.no_sync():
                loss = token_loss_sum(self.forward(batch), batch["labels"])
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            total += loss.item()
        return total if self.layout.reports else 0.0

    def sync_gradients(self) -> None:
        """Strategies whose wrapper does not average gradients over replicas do it here."""

    def grad_norm(self) -> torch.Tensor:
        """Norm of all trainable gradients; sharded (DTensor) and plain ones may be mixed."""
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.params if p.grad is not None]
        norms = []
        for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
            if group:
                n = torch.nn.utils.get_total_norm(group)
                norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)

    def clip_gradients(self, max_norm: float) -> None:
        """As clip_grad_norm_, with a Python scalar so sharded and plain gradients both take it."""
        coef = max_norm / (self.grad_norm().item() + 1e-6)
        if coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def optimizer_step(self) -> None:
        self.sync_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cell.train.max_grad_norm:
            self.clip_gradients(self.cell.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def eval_step(self, micro: list[dict[str, torch.Tensor]], eos_id: int) -> list[float]:
        """Summed `eval_counts` of the micro-batches (this rank's share)."""
        counts = [0.0] * 5
        for batch in micro:
            counts = [a + b for a, b in zip(counts, eval_counts(self.forward(batch), batch["labels"], eos_id))]
        return counts if self.layout.reports else [0.0] * 5

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def eval_shape(self) -> tuple[int | None, int]:
        """(width, micro-batches per eval step). Pipelines need one width and full steps."""
        return None, 1

    def state_for_checkpoint(self) -> tuple[torch.nn.Module, list[torch.optim.Optimizer]]:
        return self.model, [self.optimizer]

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable weights as full tensors (gathered if sharded), on CPU, on every rank."""
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                t = p.full_tensor() if hasattr(p, "full_tensor") else p
                out[name] = t.detach().to("cpu", copy=True)
        return out
