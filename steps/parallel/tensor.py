"""tensor, and hybrid with a tensor-parallel inner group: the base model is sharded with its
Hugging Face tensor-parallel plan (column/row-parallel linears), LoRA adapters on top.

In `hybrid`, groups of `model_parallel` ranks each hold one tensor-parallel copy; the groups
are data-parallel replicas whose gradients are averaged after the backward pass.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from steps.distributed import Dist
from steps.parallel.engine import Engine, Layout
from steps.schema import CellSpec


def mesh_2d(d: Dist, model_parallel: int, inner: str):
    """(data-parallel, inner) device meshes; consecutive ranks share a model (so that a model's
    ranks sit on one node's fast links). `inner` names the inner dimension ("tp" or "pp")."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(d.device.type, (d.world // model_parallel, model_parallel),
                            mesh_dim_names=("dp", inner))
    return mesh["dp"], mesh[inner]


class TensorEngine(Engine):
    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, dp_mesh, tp_mesh, total_steps: int):
        layout = Layout(dp_mesh.get_local_rank(), dp_mesh.size(), reports=tp_mesh.get_local_rank() == 0)
        super().__init__(cell, d, model, layout, total_steps)
        if not any(hasattr(p, "device_mesh") for p in model.parameters()):
            raise RuntimeError(f"{type(model).__name__} has no tensor-parallel plan: nothing was sharded")
        self.dp_group = dp_mesh.get_group() if layout.dp_size > 1 else None

    def sync_gradients(self) -> None:
        if self.dp_group is None:
            return
        for p in self.params:
            if p.grad is not None:
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                dist.all_reduce(g, group=self.dp_group)
                g.div_(self.layout.dp_size)
