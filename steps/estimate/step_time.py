"""How long: a cell's seconds per optimizer step, worked out before it runs; no torch.

Training FLOPs per token (the report's convention, `steps.estimate.params.flops_per_token`,
plus the recomputed forward under gradient checkpointing) over the device's peak for the
precision times an efficiency for the strategy, plus the bytes a step moves (gradient
all-reduce, FSDP/ZeRO-3 gathers per micro-batch, tensor-parallel activations, pipeline sends)
over the catalog's links: overlapped with backward under data parallelism, on the critical
path for model splits; a pipeline's bubble. The efficiencies are defaults until calibrated
from measured runs (`steps.estimate.calibrate`).
"""

from __future__ import annotations

import math
import os
import re

from steps.estimate import cost, params
from steps.estimate.activations import DecoderShape
from steps.plan import catalog
from steps.plan.schema import CellSpec

PROBE_LR = 1e-5  # the probe's steps must not diverge: the learning rate does not change their time


def timed(cell: CellSpec) -> CellSpec:
    """The cell as its step time sees it (what the probe trains, what `calibrate.shape` hashes):
    what sets a step's time kept, the learning rate, seed and how long it trains fixed (so a
    cell's repeats are timed once)."""
    train = cell.train.model_copy(update={"stop_after_steps": None, "evaluate": True, "eval_every": 0, "seed": 0,
                                          "checkpoint_every": 0, "target_loss": None, "max_steps": 10_000,
                                          "epochs": None, "diverge_factor": None})
    return cell.model_copy(update={"lr": PROBE_LR, "train": train})


# Model-FLOPs utilisation a strategy reaches on a GPU at a sensible batch (defaults; calibrated
# from measured runs, see `steps.estimate.calibrate`).
DEFAULT_EFFICIENCY = {"single": 0.35, "ddp": 0.33, "zero1": 0.32, "zero2": 0.32, "fsdp": 0.30, "zero3": 0.28,
                      "zero3_offload": 0.08, "tensor": 0.25, "pipeline": 0.33, "hybrid": 0.27}
QLORA_SPEED = 0.6  # bitsandbytes dequantizes every 4-bit weight each pass
CPU_CORE_TFLOPS = 0.05  # a nominal CPU core (no datasheet peak): calibration sets the scale
# Collective bandwidth a ring reaches of the link's stated figure.
LINK_EFFICIENCY = 0.4
CPU_LINK_BYTES_S = 2e9  # gloo over shared memory


def peak_tflops(cell: CellSpec) -> float | None:
    """The device's dense peak for the cell's precision (an fp32 cell's TF32 peak where
    `train.tf32` puts its matmuls on TF32 tensor cores); a nominal core for CPU types."""
    entry = catalog.instances().get(cell.instance)
    if entry is None:
        return None
    if entry.local:
        return CPU_CORE_TFLOPS * (entry.cores_per_device or 1)
    return catalog.peak_tflops(cell.instance, cell.precision, catalog.tf32(cell))


def link_bytes_s(cell: CellSpec) -> float | None:
    """Collective bandwidth between the cell's ranks: the node's links, or the network between
    nodes; None when the ranks share nothing to talk over (one rank)."""
    if cell.world_size == 1:
        return None
    entry = catalog.instances().get(cell.instance)
    if entry is None or entry.local:
        return CPU_LINK_BYTES_S
    stated = re.search(r"(\d+(?:\.\d+)?)\s*GB/s", entry.interconnect or "")
    inside = float(stated.group(1)) * 1e9 if stated else 32e9 if "PCIe" in (entry.interconnect or "") else None
    between = entry.network_gbps * 1e9 / 8 if entry.network_gbps else None
    links = [b for b in (inside, between if cell.nodes > 1 else None) if b]
    return LINK_EFFICIENCY * min(links) if links else None


def comm_bytes(cell: CellSpec, shape: DecoderShape, counts: params.ParamCounts) -> float:
    """Bytes one rank sends per optimizer step (ring collectives: 2(n-1)/n of the data for an
    all-reduce, (n-1)/n for a gather or a scatter)."""
    layout, n = cell.layout, cell.layout.dp_size
    grad_width = 2 if cell.precision == "bf16-true" and cell.peft == "full" else 4
    width = 4 if cell.precision == "fp32" else 2
    ring = (n - 1) / n if n > 1 else 0.0
    total = 0.0
    if cell.strategy in ("ddp", "hybrid", "zero1", "zero2"):
        total += 2 * ring * counts.trainable * grad_width  # all-reduce, or reduce-scatter + all-gather
    if cell.strategy in ("fsdp", "zero3", "zero3_offload"):
        # every weight gathered for forward and again for backward, each micro-batch; gradients
        # reduce-scattered
        total += cell.grad_accum * ring * (2 * counts.total * width + counts.trainable * grad_width)
    if layout.model_split == "tensor":
        m = layout.mp_size
        per_layer = 4 * cell.micro_batch * cell.seq_len * shape.hidden * width * 2 * (m - 1) / m
        total += cell.grad_accum * shape.layers * per_layer
    if layout.model_split == "pipeline":
        total += 2 * cell.grad_accum * cell.micro_batch * cell.seq_len * shape.hidden * width
    return total


def step_seconds(cell: CellSpec, shape: DecoderShape, counts: params.ParamCounts,
                 efficiency: dict[str, float] | None = None,
                 overhead_s: float = 0.0) -> tuple[float | None, str | None]:
    """Predicted seconds per optimizer step, or None and why. `overhead_s`: what a step costs
    beside its FLOPs (launches, the optimizer, Python), 0 until calibrated."""
    peak = peak_tflops(cell)
    if not peak:
        return None, f"no peak TFLOP/s for {cell.precision} on {cell.instance} in the catalog"
    full = cell.peft == "full"
    head_dim = shape.hidden // shape.heads
    fpt = params.flops_per_token(shape.layers, shape.heads, head_dim, counts.trainable,
                                 counts.total - counts.trainable, counts.embedding, cell.seq_len, full)
    if cell.train.gradient_checkpointing:  # the forward again, in backward
        fpt += 2 * (counts.total - counts.embedding) + 4 * shape.layers * shape.heads * head_dim * cell.seq_len
    eff = (efficiency or DEFAULT_EFFICIENCY)[cell.strategy] * (QLORA_SPEED if cell.peft == "qlora" else 1.0)
    tokens = cell.global_batch * cell.seq_len
    compute = fpt * tokens / cell.world_size / (peak * 1e12 * eff)
    link = link_bytes_s(cell)
    comm = comm_bytes(cell, shape, counts) / link if link else 0.0
    if cell.layout.model_split == "pipeline":
        p, m = cell.layout.mp_size, cell.grad_accum
        compute *= (m + p - 1) / m  # the bubble
    if cell.layout.model_split:
        return overhead_s + compute + comm, None  # activations' collectives sit on the critical path
    return overhead_s + max(compute, comm), None  # gradient and weight traffic overlaps backward


LAUNCH_S = 1.0  # torchrun's own start and the rendezvous, beside each rank's imports


def cuts(cell: CellSpec) -> tuple[int, int]:
    """One layer (per pipeline stage) and two: the depths the probe times a model too large to
    time whole at (`steps.estimate.probe.depths`), and those of every probe entry before the
    probe's `VERSION` 3, which has no `layers`."""
    split = cell.layout.mp_size if cell.layout.model_split == "pipeline" else 1
    return split, 2 * split


def probed(cell: CellSpec, entry: dict, layers: int) -> dict[str, float] | None:
    """The cell on this machine from its probe (`steps.estimate.probe`): seconds per optimizer
    step and real tokens per step, the evaluations' seconds over the run, and the start-up
    (imports on every rank at once, the model's build, the data); None without a probe."""
    if not entry or entry.get("error") or entry.get("step_layer_s") is None:
        return None
    step = entry["step_base_s"] + layers * entry["step_layer_s"]
    tokens = entry["row_real_tokens"] * cell.micro_batch * cell.grad_accum * cell.dp_size
    t = cell.train
    evals = (int(t.evaluate) + (steps // t.eval_every if t.eval_every and (steps := cost.steps_of(cell)) else 0)
             if t.evaluate else 0)
    val = cell.data.val_samples or 0
    micro = math.ceil(val / cell.dp_size / cell.micro_batch) if val else 0
    eval_s = evals * micro * (entry["ev_base_s"] + layers * entry["ev_layer_s"])
    cores = os.cpu_count() or 1
    per = (catalog.instances()[cell.instance].cores_per_device or 1) if cell.instance in catalog.instances() else 1
    crowd = max(1.0, cell.world_size * per / cores) if catalog.device_kind(cell.instance) == "cpu" else 1.0
    samples = cell.data.train_samples or PROBE_DATA_SAMPLES
    startup = ((entry.get("import_s") or 0.0) * crowd + entry["build_base_s"] + layers * entry["build_layer_s"]
               + entry["data_s"] * max(1.0, samples / PROBE_DATA_SAMPLES) + (LAUNCH_S if cell.world_size > 1 else 0.0))
    # A model deeper than the probe's deeper cut is extrapolated (`probe.WHOLE_PARAMS`); the
    # calibration learns those apart from the cells the probe timed whole.
    depth = "exact" if layers <= (entry.get("layers") or cuts(cell))[1] else "extrapolated"
    return {"step_s": step, "tokens_per_step": tokens, "eval_s": eval_s, "startup_s": startup, "depth": depth}


PROBE_DATA_SAMPLES = 512  # what the probe reads of the data (steps.trainer.probe.DATA_SAMPLES)
