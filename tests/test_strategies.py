"""Every PEFT method under every parallel strategy, for real (2 processes, gloo on CPU; hybrid
with 4), and the equivalence that makes their numbers comparable. The methods of a strategy
are trained by one launch (tests/one_launch.py); launching cells one by one is the launcher's
and the flows' tests.

All cells train on the same 4 sequences per step: single with micro-batch 4, data-parallel
strategies with 2 ranks x 2, pipeline with 2 micro-batches of 2, tensor with 4 shared by both
ranks, hybrid with 2 replicas x 2 stages x (1 x 2). With fp32 and one seed their per-step losses
must agree with one process's.
"""

from __future__ import annotations

import math
import os

import pytest

from steps.plan import compat
from steps.plan.schema import PEFT_METHODS, STRATEGIES
from tests.conftest import make_cell, torchrun_cells, torchrun_trainer

pytestmark = pytest.mark.slow

STEPS = 4
# Compiled cells capture their graphs without inductor's code generation (minutes of C++ builds
# on this CPU); `make test-gpu` compiles with inductor.
os.environ.setdefault("FINETUNE_MATRIX_COMPILE_BACKEND", "aot_eager")
# Pinned losses of the debug preset, one process, micro-batch 4, fp32, seed 0: a change here
# means the model, the data, the loss or the optimizer changed.
GOLDEN = {
    "full": [5.426603, 4.975224, 4.761899, 4.65802],
    "lora": [5.426603, 5.409957, 5.400256, 5.430566],  # PEFT's default targets for Llama: q_proj, v_proj
}


VARIANTS = {  # what a variant changes in a cell, beside the strategy's shape
    "fp32": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "packed": {"data": {"packing": True}},
    "fused": {"train": {"fused_optimizer": "on"}},
    "compiled": {"train": {"compile": "layers"}},
    "chunked": {"train": {"loss": "chunked", "loss_chunk": 48}},  # rank micro-batches of 64 or 128 tokens
    # Plain SGD without clipping: the update is the gradient itself, so a gradient off by a
    # constant factor shows (AdamW divides a constant factor out, and clipping to one norm
    # hides it on the steps it clips).
    "sgd": {"lr": 0.5, "train": {"optimizer": "sgd", "max_grad_norm": None}},
    # train.lora_kernels, on every linear layer (so the MLP runs as one SwiGLU function), and
    # PEFT on the same layers to compare with
    "all-linear": {"train": {"lora_kernels": False, "lora": {"target_modules": "all-linear"}}},
    "kernels": {"train": {"lora_kernels": True, "lora": {"target_modules": "all-linear"}}},
    "bf16-true": {"precision": "bf16-true"},
}


def cell_for(peft: str, strategy: str, variant: str = "fp32"):
    shapes = {
        "single": dict(gpus=1, micro_batch=4, grad_accum=1),
        "single-accum": dict(gpus=1, micro_batch=2, grad_accum=2),
        "tensor": dict(gpus=2, micro_batch=4, grad_accum=1),
        "pipeline": dict(gpus=2, micro_batch=2, grad_accum=2),
        "hybrid": dict(gpus=4, micro_batch=1, grad_accum=2),
        "hybrid-tensor": dict(gpus=4, micro_batch=2, grad_accum=1,
                              train={"parallel": {"hybrid_inner": "tensor"}}),
    }
    shape = shapes.get(strategy, dict(gpus=2, micro_batch=2, grad_accum=1))
    change = VARIANTS[variant]
    train = {"max_steps": STEPS, "timing_warmup_steps": 1, **shape.pop("train", {}), **change.get("train", {})}
    return make_cell(peft=peft, strategy=strategy.split("-")[0] if strategy != "single-accum" else "single",
                     train=train, **shape, **{k: v for k, v in change.items() if k != "train"})


CASES = [(p, s) for p in PEFT_METHODS for s in (*STRATEGIES, "hybrid-tensor")
         if compat.refusal(cell_for(p, s)) is None]
# Mixed precision as GPU users run it: LoRA's frozen base stored in bf16, adapters and their
# optimizer states in fp32, matmuls in bf16 under autocast (DeepSpeed: its own bf16 casting).
BF16_STRATEGIES = ["single", "ddp", "fsdp", "zero2", "zero3", "tensor", "pipeline", "hybrid"]
BF16_CASES = [("lora", s, "bf16-mixed") for s in BF16_STRATEGIES] + [("full", s, "bf16-mixed") for s in
                                                                     ("single", "ddp", "fsdp", "zero3")]
# The fast paths that run on CPU, under the strategies they can run with.
FAST_CASES = ([("lora", s, "packed") for s in ("single", "ddp", "fsdp", "zero3", "tensor", "pipeline")]
              + [(p, s, "fused") for p in ("lora", "full") for s in ("single", "ddp", "fsdp", "zero2", "tensor")]
              + [("lora", s, "compiled") for s in ("single", "ddp", "fsdp")]
              + [(p, s, "chunked") for p in ("lora", "full") for s in ("single", "ddp", "zero2")])
# Every strategy that sums or averages gradients over ranks, micro-batches or stages.
SGD_CASES = [("lora", s, "sgd") for s in ("single", "single-accum", "ddp", "fsdp", "zero2", "zero3", "tensor",
                                           "pipeline", "hybrid")]
# LoRA's kernels under every strategy that keeps the adapted modules whole.
KERNEL_STRATEGIES = ["single", "ddp", "fsdp", "zero1", "zero2", "pipeline", "hybrid"]
KERNEL_CASES = ([(p, "single", "all-linear") for p in ("lora", "qlora")]
                + [("lora", s, "kernels") for s in KERNEL_STRATEGIES]
                + [("qlora", s, "kernels") for s in ("single", "ddp", "fsdp", "zero2", "pipeline")])
# QLoRA in 16 bits (its unquantized weights, residual stream and activations bf16) under every
# strategy that runs QLoRA.
QLORA16_CASES = [("qlora", s, "bf16-true") for s in ("single", "ddp", "fsdp", "zero1", "zero2", "zero3",
                                                      "zero3_offload", "pipeline", "hybrid")]
VARIANT_CASES = BF16_CASES + FAST_CASES + SGD_CASES + KERNEL_CASES + QLORA16_CASES
# QLoRA under bf16-true on one process as the trainer ran it while PEFT's
# prepare_model_for_kbit_training cast every unquantized weight, and with them the residual
# stream and the activations, to fp32 (steps.trainer.modeling.apply_peft says why that changed).
QLORA_FP32_PATH = {"losses": [5.421020, 5.403137, 5.390148, 5.430171], "val_loss": 5.372598}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (peft, strategy) trained once per test session, on first use: every case of the
    same world size shares one torchrun launch (each cell still its own `main`, metrics and
    folder), which pays torch's start-up once instead of once per strategy."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("strategies")

    def get(peft: str, strategy: str, variant: str = "fp32"):
        if (peft, strategy, variant) not in cache:
            size = cell_for(peft, strategy).world_size
            every = ([(p, s, "fp32") for p, s in CASES] + [(p, "single-accum", "fp32") for p in PEFT_METHODS]
                     + VARIANT_CASES)
            todo = [c for c in every if cell_for(*c).world_size == size and c not in cache]
            proc, found = torchrun_cells([cell_for(*c) for c in todo], [root / "-".join(c) for c in todo])
            cache.update({case: (proc, m) for case, m in zip(todo, found, strict=True)})
        return cache[(peft, strategy, variant)]

    return get


def test_the_refused_pairs_are_the_documented_ones():
    refused = sorted((p, s) for p in PEFT_METHODS for s in (*STRATEGIES, "hybrid-tensor")
                     if compat.refusal(cell_for(p, s)))
    assert refused == [("dora", "hybrid-tensor"), ("dora", "tensor"),
                       ("qlora", "hybrid-tensor"), ("qlora", "tensor")]


@pytest.mark.parametrize("peft,strategy", CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_every_supported_pair_trains(runs, peft, strategy):
    proc, m = runs(peft, strategy)
    assert m["outcome"] == "ok", (m.get("error"), proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]  # every cell of the launch ended ok
    losses = [p["loss"] for p in m["loss_curve"]]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    assert math.isfinite(m["val_loss"]) and m["tokens_per_s"] > 0
    assert len(m["peak_mem_gb_per_rank"]) == cell_for(peft, strategy).world_size
    assert 0 < m["trainable_params"] <= m["total_params"]
    if peft != "full":
        assert m["trainable_params"] < m["total_params"] / 4


@pytest.mark.parametrize("peft", ["full", "lora"])
def test_single_process_losses_are_pinned(runs, peft):
    _, m = runs(peft, "single")
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(GOLDEN[peft], rel=1e-5)


EQUIVALENT = ["single-accum", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload",
              "tensor", "pipeline", "hybrid", "hybrid-tensor"]


@pytest.mark.parametrize("strategy", EQUIVALENT)
@pytest.mark.parametrize("peft", ["full", "lora", "dora", "qlora"])
def test_strategies_give_the_same_losses_as_one_process(runs, peft, strategy):
    if compat.refusal(cell_for(peft, strategy)):
        pytest.skip("refused combination")
    _, ref = runs(peft, "single")
    _, m = runs(peft, strategy)
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref["loss_curve"]], rel=1e-4)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)


def test_a_refused_combination_run_alone_is_an_error(tmp_path):
    proc, m = torchrun_trainer(make_cell(peft="qlora", strategy="tensor", gpus=2), tmp_path)
    assert proc.returncode == 1
    assert m["outcome"] == "error"
    assert m["error"].startswith("ValueError: this combination cannot run: qlora with tensor parallelism")


def test_lora_under_bf16_mixed_stores_the_frozen_base_in_bf16(runs):
    """What mixed precision holds: the fp32 run's parameter counts, and a peak no higher."""
    _, m = runs("lora", "single", "bf16-mixed")
    _, ref = runs("lora", "single")
    assert m["outcome"] == "ok", m["error"]
    assert (m["trainable_params"], m["total_params"]) == (ref["trainable_params"], ref["total_params"])
    assert m["weights_dtype"] == "bf16" and ref["weights_dtype"] == "fp32"


@pytest.mark.parametrize("peft,strategy", [(p, s) for p, s, _ in BF16_CASES if s != "single"],
                         ids=[f"{p}-{s}" for p, s, _ in BF16_CASES if s != "single"])
def test_strategies_under_bf16_mixed_track_one_process(runs, peft, strategy):
    """bf16 rounds every matmul output to 8 significant bits (unit roundoff 2**-9 = 2e-3); a
    strategy changes how partial sums are split and reduced, so single steps differ by a few
    roundings. Averaged over ~1,000 target tokens per step the loss moves far less: 5e-3 is
    about two bf16 ulps of the loss, while a real error (a missed gradient average, a wrong
    shard) moves the second step's loss by 1e-2 or more (the fp32 suite's failure cases)."""
    _, ref = runs(peft, "single", "bf16-mixed")
    _, m = runs(peft, strategy, "bf16-mixed")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref["loss_curve"]], rel=5e-3)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=5e-3)


def test_qlora_in_16_bits_trains_as_the_fp32_path_did(runs):
    """The same steps' losses within the bf16 tolerance above (5e-3)."""
    _, m = runs("qlora", "single", "bf16-true")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(QLORA_FP32_PATH["losses"], rel=5e-3)
    assert m["val_loss"] == pytest.approx(QLORA_FP32_PATH["val_loss"], rel=5e-3)


@pytest.mark.parametrize("strategy", [s for _, s, _ in QLORA16_CASES if s != "single"])
def test_qlora_in_16_bits_runs_under_every_strategy_and_tracks_one_process(runs, strategy):
    _, ref = runs("qlora", "single", "bf16-true")
    _, m = runs("qlora", strategy, "bf16-true")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref["loss_curve"]], rel=5e-3)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=5e-3)


@pytest.mark.parametrize("strategy", [s for _, s, _ in SGD_CASES if s != "single"])
def test_every_strategy_s_gradient_is_one_process_s(runs, strategy):
    """Under SGD the step is the gradient: each strategy's losses are one process's within the
    fp32 tolerance. Pipeline schedules divide gradients by their micro-batches unless told not
    to; with that, pipeline and hybrid trained at half the gradient (step 2 off by 1e-3)."""
    _, ref = runs("lora", "single", "sgd")
    _, m = runs("lora", strategy, "sgd")
    assert m["outcome"] == "ok", m["error"]
    ref_losses = [p["loss"] for p in ref["loss_curve"]]
    assert ref_losses[-1] < ref_losses[0] - 0.01  # the steps move the loss: a wrong scale would show
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(ref_losses, rel=1e-4)


@pytest.mark.parametrize("peft,strategy", [(p, s) for p, s, v in FAST_CASES if v == "fused"],
                         ids=[f"{p}-{s}" for p, s, v in FAST_CASES if v == "fused"])
def test_the_fused_optimizer_gives_the_losses_of_the_unfused_one(runs, peft, strategy):
    """One kernel for every parameter's AdamW update instead of one per tensor: the same
    arithmetic, so fp32 losses agree to rounding (1e-5)."""
    _, ref = runs(peft, strategy)
    _, m = runs(peft, strategy, "fused")
    assert m["outcome"] == "ok", m["error"]
    assert m["fused_optimizer"] is True and ref["fused_optimizer"] is False  # auto: off on the CPU
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx([p["loss"] for p in ref["loss_curve"]], rel=1e-5)


@pytest.mark.parametrize("strategy", [s for _, s, v in FAST_CASES if v == "packed" and s != "single"])
def test_packed_rows_give_one_process_s_losses_under_every_strategy(runs, strategy):
    """Packed rows carry position ids that restart per example; every strategy must hand them
    to the model (a pipeline to each stage) or attention would cross examples there only."""
    _, ref = runs("lora", "single", "packed")
    _, m = runs("lora", strategy, "packed")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx([p["loss"] for p in ref["loss_curve"]], rel=1e-4)
    _, unpacked = runs("lora", "single")
    assert m["loss_curve"][0]["tokens"] > unpacked["loss_curve"][0]["tokens"]  # full rows, no padding


@pytest.mark.parametrize("strategy", [s for _, s, v in FAST_CASES if v == "compiled"])
def test_compiled_layers_give_the_eager_losses(runs, strategy):
    """torch.compile fuses the layer's element-wise work; fp32 results move by rounding only."""
    _, ref = runs("lora", strategy)
    _, m = runs("lora", strategy, "compiled")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx([p["loss"] for p in ref["loss_curve"]], rel=1e-4)


@pytest.mark.parametrize("peft,strategy", [(p, s) for p, s, v in FAST_CASES if v == "chunked"],
                         ids=[f"{p}-{s}" for p, s, v in FAST_CASES if v == "chunked"])
def test_the_chunked_loss_gives_the_losses_of_the_logits(runs, peft, strategy):
    """The loss summed chunk by chunk, each chunk's logits rebuilt in backward: the same sums in
    another order, through DDP's and DeepSpeed's wrappers (their gradient hooks see the head's
    gradient, taken outside the forward pass): fp32 losses agree to rounding (1e-5)."""
    _, ref = runs(peft, strategy)
    _, m = runs(peft, strategy, "chunked")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx([p["loss"] for p in ref["loss_curve"]], rel=1e-5)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-5)


@pytest.mark.parametrize("peft,strategy", [(p, s) for p, s, v in KERNEL_CASES if v == "kernels"],
                         ids=[f"{p}-{s}" for p, s, v in KERNEL_CASES if v == "kernels"])
def test_lora_kernels_give_peft_s_losses_under_every_strategy_that_keeps_modules_whole(runs, peft, strategy):
    """train.lora_kernels computes PEFT's maths in another order (steps/trainer/lora_kernels.py):
    under each strategy its fp32 losses are one PEFT process's on the same layers within the
    strategies' own tolerance (1e-4)."""
    _, ref = runs(peft, "single", "all-linear")
    _, m = runs(peft, strategy, "kernels")
    assert m["outcome"] == "ok", m["error"]
    assert m["trainable_params"] == ref["trainable_params"]
    layers = 2  # the debug preset's: every projection and both MLPs ran through the kernels
    assert m["lora_kernels"] == {"mlp": layers, "linear": 7 * layers} and ref["lora_kernels"] is None
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(
        [p["loss"] for p in ref["loss_curve"]], rel=1e-4)
    assert m["val_loss"] == pytest.approx(ref["val_loss"], rel=1e-4)
