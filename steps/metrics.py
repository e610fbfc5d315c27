"""What a cell measures and how it is written: `metrics.json`, the contract the flow reads.

Names follow ../shared/DESIGN.md section 4/5 (the results table uses the same names).
Importing this module does not import torch: the flow's processes read metrics without it.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EXIT_OK, EXIT_ERROR, EXIT_OOM = 0, 1, 3

# Working files the trainer leaves for the launcher's hang watch, in the cell's folder: one
# heartbeat file per rank, and rank 0's curve so far (one JSON point per line).
HEARTBEAT_DIR = "heartbeat"
PARTIAL_CURVES = "partial.jsonl"


def rank_prefix(rank: int) -> str:
    """What starts each log line of a rank, as torchrun's `--tee` writes it."""
    return f"[default{rank}]:"

LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes", "metaflow")


def peak_memory_gb(device: torch.device) -> float:
    """GPU: max allocated by the caching allocator; CPU: the process's peak resident set."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def peak_reserved_gb(device: torch.device) -> float | None:
    import torch

    return torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def device_name(device: torch.device) -> str:
    import torch

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


def write_json_atomic(path: Path, data: dict[str, Any], first_wins: bool = False) -> bool:
    """Write via a temp file; with first_wins, keep an existing file (the first failure report)."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str, allow_nan=True))
    if first_wins:
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    os.replace(tmp, path)
    return True


def read_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
