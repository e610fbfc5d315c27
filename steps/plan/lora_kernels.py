"""Where `train.lora_kernels` applies; no torch.

The kernels compute PEFT's maths, dropout's masks included, so losses do not change either way
(`steps.plan.equivalence`); they keep less for backward. `auto`, the default, runs them wherever
they serve a cell, as `true` does; a cell they cannot serve is not refused: it runs PEFT's own
modules, and its row says why (`lora_kernels_off`; under `auto` only LoRA and QLoRA cells say,
since nothing was asked of the others). The trainer (`steps.trainer.modeling.apply_peft`), the
memory model (`steps.estimate.memory.kernels_of`) and the time calibration
(`steps.estimate.calibrate`) all ask this one rule, so that each cell is planned as it runs.

The kernels compute plain LoRA (or QLoRA) on bias-free `torch.nn.Linear` layers left whole:
they read each adapted module's weights without calling the module.
"""

from __future__ import annotations

import math
from typing import Any

from steps.plan.layout import ParallelLayout
from steps.plan.schema import CellSpec

ADAPTERS = ("lora", "qlora")


def setting(value: Any) -> str:
    """A results row's `train.lora_kernels` as the schema's word: rows written before the setting
    was a word hold a boolean, and rows written before it existed hold nothing (PEFT's modules
    ran: `false`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "false"
    return str(value).lower()


def why_not(peft: str, layout: ParallelLayout, compile: str) -> str | None:
    """Why the kernels cannot serve a cell of this method, layout and `train.compile`; None
    where they can. The row's form of it: settings a results table or a plan row holds."""
    if peft == "full":
        return "full fine-tuning has no LoRA adapters"
    if peft not in ADAPTERS:
        return f"{peft} is not plain LoRA: its magnitude rescales each output"
    if layout.model_split == "tensor":
        return f"tensor parallelism ({layout.strategy}) splits the adapted projections across ranks"
    if layout.zero_stage == 3:
        return (f"{layout.strategy} gathers a module's weights as the module is called, and the kernels "
                f"read them without calling it")
    if compile != "off":
        return f"train.compile: {compile} traces PEFT's own ops"
    return None


def model_why_not(model_type: str, not_plain: dict[str, str]) -> str:
    """Why the kernels cannot serve a model whose adapted layers are not all bias-free Linear
    layers (`not_plain`: {last name: what it is}, the model's facts or the trainer's look)."""
    odd = ", ".join(f"{name} ({what})" for name, what in sorted(not_plain.items()))
    are = "is" if len(not_plain) == 1 else "are"
    return f"the kernels compute LoRA on bias-free Linear layers and {model_type}'s {odd} {are} not"


def off_reason(cell: CellSpec, not_plain: dict[str, str] | None = None, model_type: str = "the model") -> str | None:
    """Why a cell runs PEFT's modules although `train.lora_kernels` is `auto` or `true`; None
    where the kernels run, where the setting is `false`, and (`auto`) for cells that are not
    LoRA or QLoRA. `not_plain`: the adapted layers the kernels cannot compute, where known (a
    `true` cell with such layers is refused before it runs: `steps.plan.compat`)."""
    wanted = cell.train.lora_kernels
    if wanted == "false" or (wanted == "auto" and cell.peft not in ADAPTERS):
        return None
    reason = why_not(cell.peft, cell.layout, cell.train.compile)
    if reason is None and not_plain:
        reason = model_why_not(model_type, not_plain)
    return reason


def applies(cell: CellSpec, not_plain: dict[str, str] | None = None) -> bool:
    """The kernels serve this cell: asked for (`auto` or `true`) and able to."""
    return (cell.train.lora_kernels != "false" and not not_plain
            and why_not(cell.peft, cell.layout, cell.train.compile) is None)
