"""`train.loss: chunked`: the next-token loss from the final hidden states, a chunk of tokens at
a time, so that the b x s x V logits (with their fp32 copy, log-softmax and gradients: 12 bytes
per vocabulary entry per token at the loss's peak, the largest activation of a small model
with a large vocabulary) never exist at once.

Each chunk's logits are rebuilt in backward (non-reentrant checkpoint: one more head matmul,
2·h·V FLOPs per token); with `train.liger` on CUDA, Liger Kernel's fused linear cross-entropy
does the same in Triton, computing the gradients chunk by chunk in forward.

The model still runs its own forward (through DDP's or DeepSpeed's wrapper, so their hooks
run); only its output head is tapped for that call: it hands back its input and an empty
logits tensor instead of computing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from steps.trainer.data import IGNORE


@contextlib.contextmanager
def tapped_head(head: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, `head` keeps the hidden states it is called with and returns empty logits."""
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"train.loss: chunked needs a plain linear output head; this model's is "
                         f"{type(head).__name__} (an adapter on lm_head?); use train.loss: logits")
    kept: list[torch.Tensor] = []

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        kept.append(hidden)
        return hidden[..., :0]

    head.forward = forward
    try:
        yield kept
    finally:
        del head.forward


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, ignore_index=IGNORE, reduction="sum")


def chunked_loss_sum(hidden: torch.Tensor, head: torch.nn.Linear, labels: torch.Tensor, chunk: int,
                     liger: bool = False) -> torch.Tensor:
    """The summed loss over target tokens of `hidden` (b x s x h) through `head` against
    `labels` (b x s, already shifted), `chunk` tokens at a time."""
    h, y = hidden.flatten(0, 1), labels.flatten()
    if liger:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        # Outside autocast, in the head's own dtype (Liger's kernel accumulates in fp32).
        with torch.autocast(h.device.type, enabled=False):
            loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
            return loss(head.weight, h.to(head.weight.dtype), y, head.bias)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, y.numel(), chunk):
        end = start + chunk
        total = total + checkpoint(_chunk_loss, h[start:end], head.weight, head.bias, y[start:end],
                                   use_reentrant=False)
    return total
