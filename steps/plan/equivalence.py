"""Which cells must give the same losses: a cell's equivalence class, for `economy:`.

Two cells are in one class when everything that can change their losses is equal: the model,
the method and its settings, the precision, the learning rate and its schedule, the global
batch (micro-batch x accumulation x data-parallel replicas), the steps or epochs, the seeds,
the data, and whether fp32 matmuls run on TF32 tensor cores (`train.tf32` as the instance
resolves it: TF32 rounds their inputs to 10 mantissa bits; counted under every precision, as
no test shows which matmuls mixed precision leaves in fp32). What cannot change them is left
out, because the tests prove it:

- the strategy and how the global batch is split over ranks, micro-batches and pipeline
  stages: every method under every strategy gives the losses of one process on the same
  global batch (tests/test_trainer.py, tests/test_strategies.py: fp32 within 1e-4 relative,
  bf16 within 5e-3);
- the fast paths (fused optimizer, compile, Liger, the chunked loss, the attention kernel,
  activation checkpointing, LoRA's kernels): each gives the losses of the run without it
  (tests/test_fast_paths.py, tests/test_lora_kernels.py: the kernels draw PEFT's dropout masks,
  and a cell they cannot serve runs without them);
- where and how a cell runs: instance, nodes, GPUs, launcher, time limits, checkpoints, a
  memory cap, evaluation frequency, what is saved.

Anything not named here counts, so a new setting splits classes until it is shown not to matter.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any

from steps.plan import catalog
from steps.plan.schema import CellSpec
from steps.plan.settings import RUN_LIMITS

# Settings of `train` that cannot change a cell's losses (see the module's docstring): the run
# limits, and these.
NOT_NUMERIC_TRAIN = frozenset({path.split(".")[1] for path in RUN_LIMITS} | {
    "checkpoint_every", "memory_cap_gb", "save_adapter", "timing_warmup_steps", "evaluate", "parallel",
    "fused_optimizer", "compile", "liger", "loss", "loss_chunk", "attn_implementation",
    "gradient_checkpointing", "lora_kernels",
})
# Axes that cannot: where the cell runs and how its global batch is split (and where it logs).
NOT_NUMERIC_AXES = frozenset({"cell_id", "matrix", "repeat", "strategy", "instance", "nodes", "gpus", "micro_batch",
                              "grad_accum", "track", "track_context"})


def class_settings(cell: CellSpec) -> dict[str, Any]:
    """What decides a cell's losses, as plain data (its global batch in place of the split, and
    TF32 as it resolves on the cell's instance: auto on an A100 and true there are one class,
    auto on an A100 and on a V100 two). Named only where on, so that the classes of cells without
    TF32 keep the names they had before the setting."""
    exclude: dict[str, Any] = {axis: True for axis in NOT_NUMERIC_AXES}
    exclude["train"] = {*NOT_NUMERIC_TRAIN, "tf32"}  # the setting; what it resolves to counts
    out = cell.model_dump(mode="json", exclude=exclude)
    out["global_batch"] = cell.global_batch
    if catalog.tf32(cell):
        out["tf32"] = True
    return out


def quality_class(cell: CellSpec) -> str:
    """A short, stable name of the cell's class: `q-` and a hash of `class_settings`."""
    blob = json.dumps(class_settings(cell), sort_keys=True, separators=(",", ":"), default=str)
    return "q-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def classes(cells: list[CellSpec]) -> dict[str, list[CellSpec]]:
    """The cells by class, each class's members in matrix order; classes in order of first member."""
    out: dict[str, list[CellSpec]] = defaultdict(list)
    for cell in cells:
        out[quality_class(cell)].append(cell)
    return dict(out)


def describe(cell: CellSpec) -> str:
    """What a class shares, in a line a person reads (its model, method, precision, lr, batch)."""
    return (f"{cell.model} {cell.peft} {cell.precision} lr {cell.lr:g} global batch {cell.global_batch} "
            f"x {cell.seq_len}")


def run_spec(planned: dict[str, Any]) -> CellSpec:
    """The cell as the trainer runs it (`PlannedCell.to_dict()`'s): a speed member trains the
    first `speed_steps` steps of its full run (the same schedule, so its steps are the class's
    first ones), validated only if asked; its id and settings stay the configuration's, so its
    results row is the configuration's."""
    cell = CellSpec.model_validate(planned["cell"])
    economy = planned.get("economy") or {}
    if economy.get("role") != "speed":
        return cell
    train = cell.train.model_copy(update={"stop_after_steps": economy["speed_steps"], "save_adapter": False,
                                          "evaluate": bool(economy.get("evaluate_speed"))})
    return cell.model_copy(update={"train": train})
