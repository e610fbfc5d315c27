"""tensor, and hybrid with a tensor-parallel inner group: the base model is sharded with its
Hugging Face tensor-parallel plan (column/row-parallel linears), LoRA adapters on top.

The model arrives sharded (`modeling.load_model(tp_mesh=...)`); what remains is the plain
engine, with the gradient averaging of replicas that hybrid needs (`ModelSplitEngine`).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from steps.plan.schema import CellSpec
from steps.trainer.distributed import Dist, Meshes
from steps.trainer.engines.base import ModelFacts, ModelSplitEngine


class TensorEngine(ModelSplitEngine):
    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts,
                 total_steps: int, meshes: Meshes):
        if not any(isinstance(p, DTensor) for p in model.parameters()):
            raise RuntimeError(f"{type(model).__name__} has no tensor-parallel plan: nothing was sharded")
        super().__init__(cell, d, model, facts, total_steps, meshes)
