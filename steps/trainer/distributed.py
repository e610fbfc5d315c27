"""Process-group setup from torchrun's environment, and the few collectives the loop needs.

Without torchrun (plain `python -m steps.train`) everything degrades to one process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist

from steps.plan.layout import ParallelLayout

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_s: float = 1800, gpu: bool = True) -> Dist:
    """This process in the group. gpu: the cell's instance is a GPU type, so each rank takes its
    local GPU where there is one; a CPU instance runs on the CPU even on a machine with GPUs
    (the CPU twin of a study). A GPU cell on a machine without one (the SageMaker emulator of
    the tests) trains on the CPU and says so; its MFU is then not reported."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if gpu and torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU: this process sees "
                               f"{torch.cuda.device_count()} (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        if gpu and rank == 0:
            print("the cell's instance is a GPU type but no CUDA GPU is visible: training on the CPU",
                  file=sys.stderr, flush=True)
        device = torch.device("cpu")
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return Dist(rank=rank, local_rank=local_rank, world=world, device=device)


class Meshes(NamedTuple):
    """The 1-D device meshes of a rank's row and column in the layout's grid."""

    dp: DeviceMesh  # the replicas of this rank's place in the model copy
    mp: DeviceMesh  # the ranks that hold this rank's model copy between them


# transformers and peft find a tensor-parallel mesh by this name.
MESH_NAMES = {"tensor": "tp", "pipeline": "pp"}


def mesh_2d(d: Dist, layout: ParallelLayout) -> Meshes:
    """The layout's (data-parallel, model-parallel) grid as device meshes: consecutive ranks hold
    one model copy, so that they sit on one node's fast links. Every rank must call it."""
    from torch.distributed.device_mesh import init_device_mesh

    inner = MESH_NAMES[layout.model_split]
    mesh = init_device_mesh(d.device.type, (layout.dp_size, layout.mp_size), mesh_dim_names=("dp", inner))
    return Meshes(mesh["dp"], mesh[inner])


def shutdown(end: bool = True) -> None:
    """Every rank reaches the barrier before any tears its connections down (gloo aborts a
    peer that is still sending to a rank that has gone). DeepSpeed tears down through its own
    comm layer, which also drops the groups it keeps (a later process group would otherwise
    meet them, destroyed)."""
    if dist.is_initialized():
        dist.barrier()
        if not end:
            return
        deepspeed_comm = sys.modules.get("deepspeed.comm")
        if deepspeed_comm is not None and deepspeed_comm.is_initialized():
            deepspeed_comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective (float64 keeps counts exact)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_float(value: float, device: torch.device) -> list[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if not dist.is_initialized():
        return [value]
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.item() for x in out]
