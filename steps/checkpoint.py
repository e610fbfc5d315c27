"""Checkpoints every K steps, `--resume` from the last complete one, and the final adapter.

Trainable weights and optimizer state go through torch.distributed.checkpoint (every rank
writes its own shard, whatever the strategy) or DeepSpeed's own checkpointing; the scheduler,
RNG states and the loop's progress are saved per rank beside them. A checkpoint counts only
once every rank has written it (`complete`).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from steps.distributed import Dist

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


def _is_deepspeed(engine) -> bool:
    from steps.parallel.zero import ZeroEngine  # deepspeed itself is imported only when used

    return isinstance(engine, ZeroEngine)


def _dcp_state(engine):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optimizers = engine.state_for_checkpoint()
    # Flat keys (one per parameter) keep pipeline stages, which hold different parameters, apart.
    options = StateDictOptions(ignore_frozen_params=True, strict=False, flatten_optimizer_state_dict=True)
    msd, osd = get_state_dict(model, optimizers, options=options)
    return model, optimizers, options, {"model": msd, "optim": osd}


def save(engine, step: int, progress: dict[str, Any], out_dir: Path, d: Dist) -> Path:
    folder = _folder(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    if _is_deepspeed(engine):
        engine.module.save_checkpoint(str(folder), tag="deepspeed", exclude_frozen_parameters=True)
    else:
        import torch.distributed.checkpoint as dcp

        *_, state = _dcp_state(engine)
        dcp.save(state, checkpoint_id=str(folder / "dcp"))
    extras = {"step": step, "progress": progress, "rng": _rng_state(),
              "scheduler": None if _is_deepspeed(engine) else engine.scheduler.state_dict(),
              "scaler": engine.scaler.state_dict() if engine.scaler else None}
    torch.save(extras, folder / f"rank{d.rank}.pt")
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


def load(engine, folder: Path, d: Dist) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimizer, scheduler, scaler and RNG; return (step, progress)."""
    if _is_deepspeed(engine):
        engine.module.load_checkpoint(str(folder), tag="deepspeed", load_module_strict=False,
                                      load_optimizer_states=True, load_lr_scheduler_states=True)
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model, optimizers, options, state = _dcp_state(engine)
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(model, optimizers, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
    extras = torch.load(folder / f"rank{d.rank}.pt", weights_only=False)
    if extras["scheduler"] is not None:
        engine.scheduler.load_state_dict(extras["scheduler"])
    if engine.scaler and extras["scaler"]:
        engine.scaler.load_state_dict(extras["scaler"])
    _set_rng_state(extras["rng"])
    return extras["step"], extras["progress"]


def save_adapter(engine, out_dir: Path, d: Dist) -> Path | None:
    """The trained adapter alone, in PEFT's format (`PeftModel.from_pretrained` loads it)."""
    peft_model = getattr(engine, "peft_model", None)
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
