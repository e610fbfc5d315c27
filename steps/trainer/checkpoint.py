"""Checkpoints every K steps, `--resume` from the last complete one, and the final adapter.

The engine writes its trainable weights and optimizer state its own way (every rank its own
shard through torch.distributed.checkpoint, or DeepSpeed's checkpointing); the scheduler, RNG
states and the loop's progress are saved per rank beside them. A checkpoint counts only once
every rank has written it (`complete`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from steps.trainer.distributed import Dist
from steps.trainer.engines.base import Engine
from steps.trainer.progress import Progress

KEEP = 2


def _folder(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine: Engine, step: int, progress: Progress, out_dir: Path, d: Dist) -> Path:
    folder = _folder(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    own = engine.save_state(folder)
    torch.save({"step": step, "progress": progress.to_dict(), "rng": _rng_state(), **own},
               folder / f"rank{d.rank}.pt")
    _barrier()
    if d.is_main:
        (folder / "complete").touch()
        done = sorted(p for p in folder.parent.iterdir() if (p / "complete").exists())
        for old in done[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest(out_dir: Path) -> Path | None:
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir() if (p / "complete").exists())
    return done[-1] if done else None


def load(engine: Engine, folder: Path, d: Dist) -> tuple[int, Progress]:
    """Restore weights, optimizer, scheduler, scaler and RNG; return (step, progress)."""
    extras = torch.load(folder / f"rank{d.rank}.pt", weights_only=False)
    engine.load_state(folder, extras)
    _set_rng_state(extras["rng"])
    return extras["step"], Progress.from_dict(extras["progress"])


def save_adapter(engine: Engine, out_dir: Path, d: Dist) -> Path | None:
    """The trained adapter alone, in PEFT's format (`PeftModel.from_pretrained` loads it)."""
    peft_model = engine.peft_model
    if peft_model is None:
        return None
    state = engine.full_trainable_state()  # collective where weights are sharded
    parts = [None] * d.world if d.is_main else None
    if dist.is_initialized():
        dist.gather_object(state, parts, dst=0)
    else:
        parts = [state]
    path = out_dir / "adapter"
    if d.is_main:
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        peft_model.save_pretrained(str(path), state_dict=merged)
    _barrier()
    return path if d.is_main else None
