"""Parallel strategies. `build_engine` turns a cell into the engine its layout needs."""

from __future__ import annotations

import torch

from steps.plan.schema import CellSpec
from steps.trainer import modeling
from steps.trainer.distributed import Dist, mesh_2d
from steps.trainer.engines.base import Engine, ModelFacts
from steps.trainer.engines.data_parallel import DDPEngine, FSDPEngine
from steps.trainer.engines.pipeline import PipelineEngine
from steps.trainer.engines.tensor import TensorEngine
from steps.trainer.engines.zero import ZeroEngine  # imports deepspeed only when one is built


def build_engine(cell: CellSpec, d: Dist, vocab_size: int, total_steps: int) -> Engine:
    """The engine of the cell's strategy, given the model facts taken before it shards or splits
    the model."""
    split = cell.layout.model_split
    if split is None:
        model = _load(cell, d, vocab_size)
        engine = ZeroEngine if cell.layout.deepspeed else {"ddp": DDPEngine, "fsdp": FSDPEngine}.get(
            cell.strategy, Engine)
        return engine(cell, d, model, ModelFacts.of(model), total_steps)
    meshes = mesh_2d(d, cell.layout)
    if split == "tensor":
        model = _load(cell, d, vocab_size, tp_mesh=meshes.mp)  # sharded as it is built
        return TensorEngine(cell, d, model, ModelFacts.of(model), total_steps, meshes)
    model = _load(cell, d, vocab_size)
    return PipelineEngine(cell, d, model, ModelFacts.of(model), total_steps, meshes)


def _load(cell: CellSpec, d: Dist, vocab_size: int, tp_mesh=None) -> torch.nn.Module:
    model = modeling.apply_peft(modeling.load_model(cell, vocab_size, d.device, tp_mesh=tp_mesh), cell)
    return modeling.apply_fast_paths(model, cell)
