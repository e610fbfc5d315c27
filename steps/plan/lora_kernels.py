"""Where `train.lora_kernels` applies; no torch.

Users set the kernels for a whole matrix (full, LoRA and QLoRA cells together), so a cell they
cannot serve is not refused: it runs PEFT's own modules, and its row says why
(`lora_kernels_off`). The trainer (`steps.trainer.modeling.apply_peft`), the memory model
(`steps.estimate.memory.kernels_of`) and the time calibration (`steps.estimate.calibrate`) all
ask this one rule, so that each cell is planned as it runs. Losses do not change either way
(`steps.plan.equivalence`): the kernels compute PEFT's maths, dropout's mask included.

The kernels compute plain LoRA (or QLoRA) on modules left whole: they read each adapted
module's weights without calling the module.
"""

from __future__ import annotations

from steps.plan.layout import ParallelLayout
from steps.plan.schema import CellSpec


def why_not(peft: str, layout: ParallelLayout, compile: str) -> str | None:
    """Why the kernels cannot serve a cell of this method, layout and `train.compile`; None
    where they can. The row's form of it: settings a results table or a plan row holds."""
    if peft == "full":
        return "full fine-tuning has no LoRA adapters"
    if peft not in ("lora", "qlora"):
        return f"{peft} is not plain LoRA: its magnitude rescales each output"
    if layout.model_split == "tensor":
        return f"tensor parallelism ({layout.strategy}) splits the adapted projections across ranks"
    if layout.zero_stage == 3:
        return (f"{layout.strategy} gathers a module's weights as the module is called, and the kernels "
                f"read them without calling it")
    if compile != "off":
        return f"train.compile: {compile} traces PEFT's own ops"
    return None


def off_reason(cell: CellSpec) -> str | None:
    """The reason a cell that sets `train.lora_kernels` runs without them; None where it does
    not set them, or where they run."""
    if not cell.train.lora_kernels:
        return None
    return why_not(cell.peft, cell.layout, cell.train.compile)


def applies(cell: CellSpec) -> bool:
    """The cell sets `train.lora_kernels` and they serve it."""
    return cell.train.lora_kernels and off_reason(cell) is None
