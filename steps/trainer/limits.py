"""The edges of a run: the memory cap a cell trains under (to find out what fits a smaller
device), failures on purpose (`train.fault`, to test how failures are recorded), and what
counts as running out of memory (outcome `oom` rather than `error`)."""

from __future__ import annotations

import os
import resource
import signal
import time

import torch

from steps.plan.schema import CellSpec


def apply_memory_cap(cell: CellSpec, device: torch.device) -> None:
    """GPU: cap the caching allocator; CPU: cap the process's data segment (malloc fails)."""
    cap = cell.train.memory_cap_gb
    if not cap:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total), device)
    else:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (int(cap * 1e9), hard))


def inject_fault(cell: CellSpec, step: int, rank: int) -> None:
    """`train.fault`: fail on purpose at a step, to test how failures are recorded."""
    fault = cell.train.fault
    if fault is None or fault.at_step != step or fault.rank != rank:
        return
    if fault.kind == "raise":
        raise RuntimeError(f"injected failure at step {step}")
    if fault.kind == "oom":
        raise torch.OutOfMemoryError(f"injected out of memory at step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: stop making progress without exiting, like a stuck collective
        time.sleep(3600)


def is_oom(exc: BaseException) -> bool:
    """Out of device memory, or (on CPU, under the cap) a failed allocation."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))
