"""TF32 for a cell's fp32 matmuls (`train.tf32`): set for every cell, on or off, since a process
may train several cells (`main(end_process_group=False)`).

The flags are set through `torch.set_float32_matmul_precision` and `torch.backends.cudnn.allow_tf32`,
not torch 2.9's `fp32_precision` attributes: in torch 2.13, once a backend's `fp32_precision` is
set, reading the older flags raises "mix of the legacy and new APIs", and inductor's autotune
cache reads `torch.get_float32_matmul_precision()`. `set_float32_matmul_precision` sets cuBLAS's
`fp32_precision` too, so that both views agree (`tests/test_tf32.py`).
"""

from __future__ import annotations

import sys

import torch

from steps.plan.schema import CellSpec
from steps.trainer.distributed import Dist

AMPERE = (8, 0)  # the first compute capability with TF32 tensor cores


def device_has_tf32(device: torch.device) -> bool:
    """NVIDIA Ampere and later (A10G, L4, L40S, A100, H100, H200, B200); not V100, T4, a CPU."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= AMPERE


def apply(cell: CellSpec, d: Dist) -> bool:
    """Allow TF32 for fp32 matmuls and convolutions where the cell's `train.tf32` is auto or true
    and this rank's device has it, forbid it otherwise; whether it is allowed (the `tf32`
    metric). A `true` the device cannot honour runs in full fp32 and says so
    (`steps.plan.catalog.tf32`)."""
    on = cell.train.tf32 != "false" and device_has_tf32(d.device)
    torch.set_float32_matmul_precision("high" if on else "highest")
    torch.backends.cudnn.allow_tf32 = on
    if cell.train.tf32 == "true" and not on and d.is_main:
        print(f"train.tf32 is true but the device ({d.device}) has no TF32 tensor cores (Ampere or "
              f"later): fp32 matmuls run in full fp32", file=sys.stderr, flush=True)
    return on
