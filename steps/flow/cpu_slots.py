"""This machine's CPU cores (and, for `local-gpu`, its GPUs) as slots, so cells that run at
once do not skew each other.

On `local-cpu` a rank is one device and a device is `FINETUNE_MATRIX_CORES_PER_RANK` cores
(default 1). A cell holds its cores (file locks, shared by every process of this user) while it
runs and its ranks are pinned to them; a cell that finds too few free cores waits. Without
this, `--max-workers 4` on a 2-core machine would run 8 ranks on 2 cores and every tokens/s
in the table would measure the contention, not the strategy. A flow's `train` task keeps its
slots until it exits (`keep`), so the next cell does not start beside the Metaflow work that
ends the last one (its card, its artifacts).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from steps.plan import catalog


def cores_per_rank() -> int:
    return catalog.cores_per_rank()


def _lock_dir() -> Path:
    root = os.environ.get("FINETUNE_MATRIX_SLOTS_DIR") or tempfile.gettempdir()
    path = Path(root) / f"finetune-matrix-cpu-slots-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _release(held: list) -> None:
    for _, fh in held:
        fh.close()  # closing drops the flock


_KEPT: list = []  # slots a finished reservation keeps until this process exits (`keep`)


def release_kept() -> None:
    """Give back the slots kept by `keep` (the process exiting gives them back too)."""
    _release(_KEPT)
    _KEPT.clear()


@contextlib.contextmanager
def reserve(ranks: int, per_rank: int | None = None, poll_s: float = 0.25,
            keep: bool = False) -> Iterator[list[int]]:
    """Hold `ranks * per_rank` cores (default cores_per_rank(); all of them if the machine
    has fewer). `keep`: still hold them after the block, until this process exits or reserves
    again (a Metaflow task's end: its card and artifacts)."""
    cores = sorted(os.sched_getaffinity(0))
    with _hold(cores, min(len(cores), ranks * (per_rank or cores_per_rank())), "core", poll_s, keep) as held:
        yield held


@contextlib.contextmanager
def reserve_gpus(ranks: int, available: int, poll_s: float = 0.25, keep: bool = False) -> Iterator[list[int]]:
    """Hold `ranks` of this machine's `available` GPUs (`local-gpu`): two cells never share a GPU,
    and a cell waits for enough free ones. `keep`: as `reserve`'s."""
    with _hold(list(range(available)), min(ranks, available), "gpu", poll_s, keep) as held:
        yield held


@contextlib.contextmanager
def _hold(slots: list[int], want: int, kind: str, poll_s: float, keep: bool = False) -> Iterator[list[int]]:
    release_kept()  # a process reserving again is done with what it kept
    lock_dir = _lock_dir()
    while True:
        held = []
        for slot in slots:
            fh = open(lock_dir / f"{kind}{slot}.lock", "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            held.append((slot, fh))
            if len(held) == want:
                break
        if len(held) == want:
            break
        _release(held)  # all or nothing, so two waiting cells cannot deadlock
        time.sleep(poll_s)
    try:
        yield [slot for slot, _ in held]
    finally:
        if keep:
            _KEPT.extend(held)
        else:
            _release(held)
