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

import pytest

from steps.plan import compat
from steps.plan.schema import PEFT_METHODS, STRATEGIES
from tests.conftest import make_cell, torchrun_cells, torchrun_trainer

pytestmark = pytest.mark.slow

STEPS = 4
# Pinned losses of the debug preset, one process, micro-batch 4, fp32, seed 0: a change here
# means the model, the data, the loss or the optimizer changed.
GOLDEN = {
    "full": [5.426603, 4.975224, 4.761899, 4.65802],
    "lora": [5.426603, 5.409957, 5.400256, 5.430566],  # PEFT's default targets for Llama: q_proj, v_proj
}


def cell_for(peft: str, strategy: str):
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
    train = {"max_steps": STEPS, "timing_warmup_steps": 1, **shape.pop("train", {})}
    return make_cell(peft=peft, strategy=strategy.split("-")[0] if strategy != "single-accum" else "single",
                     train=train, **shape)


CASES = [(p, s) for p in PEFT_METHODS for s in (*STRATEGIES, "hybrid-tensor")
         if compat.refusal(cell_for(p, s)) is None]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each (peft, strategy) trained once per test session, on first use: every case of the
    same world size shares one torchrun launch (each cell still its own `main`, metrics and
    folder), which pays torch's start-up once instead of once per strategy."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("strategies")

    def get(peft: str, strategy: str):
        if (peft, strategy) not in cache:
            size = cell_for(peft, strategy).world_size
            every = CASES + [(p, "single-accum") for p in PEFT_METHODS]
            todo = [(p, s) for p, s in every if cell_for(p, s).world_size == size and (p, s) not in cache]
            proc, found = torchrun_cells([cell_for(p, s) for p, s in todo], [root / f"{p}-{s}" for p, s in todo])
            cache.update({case: (proc, m) for case, m in zip(todo, found, strict=True)})
        return cache[(peft, strategy)]

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
