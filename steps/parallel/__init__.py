"""Parallel strategies. `build_engine` turns a cell into the engine its strategy needs."""

from __future__ import annotations

from steps import modeling
from steps.distributed import Dist
from steps.parallel.engine import Engine, Layout
from steps.schema import CellSpec


def inner_strategy(cell: CellSpec) -> str | None:
    """The model-parallel kind a cell uses: tensor, pipeline or none."""
    if cell.strategy in ("tensor", "pipeline"):
        return cell.strategy
    if cell.strategy == "hybrid":
        return cell.train.parallel.hybrid_inner
    return None


def build_engine(cell: CellSpec, d: Dist, vocab_size: int, total_steps: int) -> Engine:
    """The engine, with `param_counts` (trainable, total, input embedding) and the model
    `config`, both taken before any strategy shards or splits the model."""
    model, make = _build(cell, d, vocab_size, total_steps)
    counts = (*modeling.count_parameters(model), modeling.embedding_parameters(model))
    config = model.config
    engine = make(model)
    engine.param_counts, engine.config = counts, config
    return engine


def _build(cell: CellSpec, d: Dist, vocab_size: int, total_steps: int):
    inner = inner_strategy(cell)
    if inner is not None:
        from steps.parallel.tensor import mesh_2d

        dp_mesh, inner_mesh = mesh_2d(d, cell.model_parallel_size, "tp" if inner == "tensor" else "pp")
        if inner == "tensor":
            from steps.parallel.tensor import TensorEngine

            model = modeling.load_model(cell, vocab_size, d.device, tp_mesh=inner_mesh)
            return modeling.apply_peft(model, cell), lambda m: TensorEngine(
                cell, d, m, dp_mesh, inner_mesh, total_steps)
        from steps.parallel.pipeline import PipelineEngine

        model = modeling.apply_peft(modeling.load_model(cell, vocab_size, d.device), cell)
        return model, lambda m: PipelineEngine(cell, d, m, dp_mesh, inner_mesh, total_steps)

    model = modeling.apply_peft(modeling.load_model(cell, vocab_size, d.device), cell)
    if cell.strategy == "single":
        from steps.parallel.data_parallel import SingleEngine

        return model, lambda m: SingleEngine(cell, d, m, Layout(0, 1, True), total_steps)
    if cell.strategy == "ddp":
        from steps.parallel.data_parallel import DDPEngine

        return model, lambda m: DDPEngine(cell, d, m, total_steps)
    if cell.strategy == "fsdp":
        from steps.parallel.data_parallel import FSDPEngine

        return model, lambda m: FSDPEngine(cell, d, m, total_steps)
    from steps.parallel.zero import ZeroEngine

    return model, lambda m: ZeroEngine(cell, d, m, total_steps)
