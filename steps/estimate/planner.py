"""Know before you spend: every cell's memory per rank, whether it fits, the cheapest change
that makes it fit, and its step time, throughput, wall time and cost; no torch.

    python -m steps.plan configs/matrix/study4-litgpt-memory.yaml

One cell's answer (`predict`) from the room's models: how much memory (`memory`: the training
state, the framework's buffers, the runtime, loading and DeepSpeed's optimizer step), how long
(`step_time`), how much money (`cost`), and the cheapest fix (`fixes`). A whole matrix:
`matrix_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from steps.estimate import cost, memory, params, step_time
from steps.estimate.activations import DecoderShape
from steps.estimate.fixes import cheapest_fix
from steps.plan import catalog, lora_kernels
from steps.plan.compat import adapter_facts
from steps.plan.schema import CellSpec


@dataclass(frozen=True)
class CellPlan:
    """What the planner predicts for one cell."""

    cell_id: str
    memory_gb: dict[str, float] = field(default_factory=dict)  # per rank, by part
    device_gb: float | None = None  # what one rank may use (the device, or the cell's cap)
    verdict: str = "?"  # fits, tight, will not fit; ? where the model or device is unknown
    fix: str | None = None  # the cheapest change that makes a cell that will not fit fit
    step_s: float | None = None
    tokens_per_s: float | None = None
    steps: int | None = None
    wall_s: float | None = None
    cost_usd: float | None = None
    note: str | None = None  # why a prediction is missing
    load_gb: float | None = None  # per rank while the model loads, before any sharding
    step_gb: float | None = None  # per rank at DeepSpeed's optimizer step, where it exceeds training
    basis: str = "catalog"  # where the time comes from: "probe" (this machine measured) or the catalog's peak
    depth: str | None = None  # probed: "exact" (the probe timed the whole depth) or "extrapolated"
    startup_s: float | None = None  # launch to the first step
    eval_s: float | None = None  # the evaluations over the run
    calibration: str | None = None  # which calibration the time used ("" or None: first principles)
    # Intervals (low, high) from the calibration's residuals; wide where none covers the cell.
    tokens_per_s_range: tuple[float, float] | None = None
    wall_s_range: tuple[float, float] | None = None
    cost_usd_range: tuple[float, float] | None = None

    @property
    def total_gb(self) -> float | None:
        """Per rank while training."""
        return sum(self.memory_gb.values()) if self.memory_gb else None

    @property
    def peak_gb(self) -> float | None:
        """Per rank at the largest of loading, training and the optimizer step."""
        if self.total_gb is None:
            return None
        return max(self.total_gb, self.load_gb or 0.0, self.step_gb or 0.0)

    def reason(self) -> str:
        """The sentence a predicted out-of-memory `skipped` row carries."""
        fix = f"; fits with {self.fix}" if self.fix else ""
        if self.step_gb and self.step_gb == self.peak_gb > self.total_gb:
            return (f"predicted out of memory at the optimizer step: {gb(self.step_gb)} GB per rank > "
                    f"{gb(self.device_gb)} GB (the training state, DeepSpeed's fp32 copy of the gradients "
                    f"and the optimizer's temporaries over its flat partition){fix}")
        if self.load_gb and self.load_gb > self.total_gb:
            return (f"predicted out of memory while loading: {gb(self.load_gb)} GB per rank > {gb(self.device_gb)} "
                    f"GB (the whole model on every rank before it is sharded; training would need "
                    f"{gb(self.total_gb)} GB){fix}")
        return (f"predicted out of memory: {gb(self.total_gb)} GB per rank > {gb(self.device_gb)} GB"
                f" ({', '.join(f'{k} {gb(v)}' for k, v in self.memory_gb.items())}){fix}")


def gb(x: float | None, missing: str = "?") -> str:
    """A size in GB to 3 significant figures below 10 (0.0507, 2.71), to 0.1 above (13.5)."""
    return missing if x is None else f"{x:.3g}" if x < 10 else f"{x:.1f}"


def arch_of(cell: CellSpec, facts: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The model's shape: the preset's config, or what the model's facts read."""
    preset = catalog.model_presets().get(cell.model)
    if preset and preset.config:
        return preset.config
    entry = (facts or {}).get(cell.model) or {}
    return entry.get("arch")


def counts_of(cell: CellSpec, arch: dict[str, Any], facts: dict[str, Any] | None) -> params.ParamCounts:
    """From the model's shape; for models that are not presets, PEFT's own count from the facts."""
    lora = cell.train.lora
    counted = params.counts(arch, cell.peft, lora.r, lora.target_modules)
    entry = (facts or {}).get(cell.model) or {}
    if catalog.model_presets().get(cell.model) or "total_params" not in entry:
        return counted
    adapter = adapter_facts(cell, entry)
    trainable = entry["total_params"] if cell.peft == "full" else adapter.get("trainable_params", counted.trainable)
    total = entry["total_params"] + (0 if cell.peft == "full" else trainable)
    return params.ParamCounts(total, trainable, counted.embedding)


def kernels_off(cell: CellSpec, facts: dict[str, Any] | None) -> str | None:
    """Why the LoRA kernels leave the cell to PEFT's modules, the model's facts considered (its
    adapted layers that are not bias-free Linear layers); None where they run or are not asked."""
    entry = (facts or {}).get(cell.model) or {}
    return lora_kernels.off_reason(cell, adapter_facts(cell, entry).get("not_plain"),
                                   entry.get("model_type", cell.model))


def predict(cell: CellSpec, facts: dict[str, Any] | None = None, compute: cost.Compute = "local",
            efficiency: dict[str, float] | None = None, fixes: bool = True, overhead_s: float = 0.0,
            probe: dict[str, Any] | None = None) -> CellPlan:
    """The planner's answer for one cell (`facts`: the models' facts, for models that are not
    presets; `efficiency`, `overhead_s`: a calibration's, else the defaults; `probe`: this
    machine's measure of the cell, `steps.estimate.probe`, which replaces the catalog's peak)."""
    arch = arch_of(cell, facts)
    if arch is None:
        return CellPlan(cell.cell_id, note=f"the shape of {cell.model} is not known without its facts")
    shape = DecoderShape.of(arch)
    counts = counts_of(cell, arch, facts)
    whole = memory.whole_weights_bytes(cell, arch, counts)
    parts = memory.memory_parts(cell, arch, counts, whole, kernels_off(cell, facts))
    device = memory.device_memory_gb(cell)
    plan = CellPlan(cell.cell_id, parts, device, load_gb=memory.load_gb(cell, counts, whole),
                    step_gb=memory.step_gb(cell, parts, counts))
    plan = replace(plan, verdict=memory.verdict(plan.peak_gb, device))
    measured = step_time.probed(cell, probe or {}, shape.layers)
    if measured is not None:
        step, why = measured["step_s"], None
        n, wall, dollars = cost.wall_and_cost(cell, step, compute, measured["startup_s"], measured["eval_s"])
        plan = replace(plan, step_s=step, tokens_per_s=measured["tokens_per_step"] / step, steps=n, wall_s=wall,
                       cost_usd=dollars, basis="probe", startup_s=measured["startup_s"], eval_s=measured["eval_s"],
                       depth=measured["depth"])
    else:
        step, why = step_time.step_seconds(cell, shape, counts, efficiency, overhead_s)
        if step is not None:
            n, wall, dollars = cost.wall_and_cost(cell, step, compute)
            plan = replace(plan, step_s=step, tokens_per_s=cell.global_batch * cell.seq_len / step, steps=n,
                           wall_s=wall, cost_usd=dollars, startup_s=cost.STARTUP_S[catalog.device_kind(cell.instance)],
                           eval_s=0.0)
    if probe and probe.get("error"):
        why = f"the probe could not time it ({probe['error'][:200]}); planned from the catalog's peak"
    plan = replace(plan, note=why)
    if fixes and plan.verdict == "will not fit":
        plan = replace(plan, fix=cheapest_fix(  # a changed cell has no probe: its memory is what matters
            cell, lambda changed: predict(changed, facts, compute, efficiency, fixes=False)))
    return plan
