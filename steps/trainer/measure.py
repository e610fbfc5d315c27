"""What the trainer measures about its device and model: peak memory, device name, FLOPs."""

from __future__ import annotations

import os
import platform
import resource
from typing import Any

import torch


def peak_memory_gb(device: torch.device) -> float:
    """GPU: max allocated by the caching allocator; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def peak_reserved_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def flops_per_token(model_config: Any, trainable: int, frozen: int, embedding: int,
                    seq_len: float, full: bool) -> float:
    """Training FLOPs per token (PaLM appendix B convention).

    Weights: 6N when every weight gets a gradient; with a frozen base, 4N_frozen (forward and
    input gradients, no weight gradients) + 6N_trainable. Input embeddings are lookups, not
    matmuls, and are left out. Attention score and value matmuls have no weights, so their
    12*L*H*Q*T (forward + backward) is the same in both cases.
    """
    layers = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    head_dim = getattr(model_config, "head_dim", None) or (hidden // heads if heads else 0)
    attention = 12 * layers * heads * head_dim * seq_len
    if full:
        return 6 * (trainable - embedding) + attention
    return 4 * (frozen - embedding) + 6 * trainable + attention
