"""The planner's memory against this machine's measurements, for real: cells of a 134M-parameter
Llama (random weights, its config written to a folder) trained by the launcher, each rank's peak
resident set beside the plan's estimate plus the cell's measured runtime baseline; and cells
under a `memory_cap_gb` that straddles them, whose predicted out-of-memory verdicts must be the
cells that do run out of memory."""

from __future__ import annotations

import json

import pytest

from steps.estimate import calibrate, planner
from steps.flow import launcher
from tests.conftest import make_cell

pytestmark = pytest.mark.slow

ARCH = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 768,
        "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
        "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

# Every strategy with full fine-tuning and LoRA, each in fp32 and bf16-true across the two
# methods; and ZeRO-3 full fine-tuning in both (its bf16-true peak is DeepSpeed's optimizer step).
ACCURACY = [("full", "single", "fp32"), ("lora", "single", "bf16-true"),
            ("full", "ddp", "bf16-true"), ("lora", "ddp", "fp32"),
            ("full", "fsdp", "fp32"), ("lora", "fsdp", "bf16-true"),
            ("full", "zero2", "bf16-true"), ("lora", "zero2", "fp32"),
            ("full", "zero3", "fp32"), ("lora", "zero3", "bf16-true"), ("full", "zero3", "bf16-true")]
TOLERANCE = 0.15

# Micro-batch x sequence length per precision. PyTorch's CPU bf16 matmuls are slow without
# native bf16 units (an AVX2 core: 0.45 GFLOP/s for the backward pass's layout against 64 in
# fp32, about 0.5 s per token per step at this size), and a bf16-true cell's peak is its loading
# (the fp32 draw of random weights) or DeepSpeed's optimizer step, not its activations: each of
# the six below peaked within 0.005 GB of its 2 x 128 peak at 1 x 16 (1.013 GB for LoRA on one
# rank, 2.505 for full ZeRO-3). The fp32 cells keep 2 x 128, where activations are in the peak.
BATCH = {"fp32": (2, 128), "bf16-true": (1, 16)}

CAP_GB = 1.5
# Cells planned well below and well above the cap (none within 10% of it). The three that fit
# are accuracy cells, trained under the cap there: a cap moves no peak, only where an
# allocation fails.
FIT_CAP = [("lora", "single", "bf16-true"), ("lora", "fsdp", "bf16-true"), ("lora", "zero3", "bf16-true")]
OVER_CAP = [("full", "single", "bf16-true"), ("full", "fsdp", "fp32"), ("full", "zero2", "bf16-true")]
# Full fine-tuning on one rank peaks while it trains: 2 x 64 tokens of activations put its plan
# 12% over the cap (6% at 1 x 16, too close to call).
OVER_CAP_BATCH = {("full", "single", "bf16-true"): (2, 64)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-134m")
    (folder / "config.json").write_text(json.dumps(ARCH))
    return str(folder)


def _cell(model: str, peft: str, strategy: str, precision: str, batch: tuple[int, int] | None = None, **train):
    micro_batch, seq_len = batch or BATCH[precision]
    return make_cell(model=model, peft=peft, strategy=strategy, gpus=1 if strategy == "single" else 2,
                     precision=precision, micro_batch=micro_batch, seq_len=seq_len,
                     train={"init": "random", "tokenizer": "byte", "max_steps": 2, "timing_warmup_steps": 1,
                            "save_adapter": False, "lr_schedule": "constant", "hang_after_s": 120, **train},
                     data={"train_samples": 32, "val_samples": 4})


def _run(model, cases, tmp, batches=None, caps=None):
    """Each case trained in its own launch (a process's peak resident set is its whole life's)."""
    facts = {model: {"arch": ARCH}}
    out = {}
    for case in cases:
        cap = (caps or {}).get(case)
        cell = _cell(model, *case, batch=(batches or {}).get(case), **({"memory_cap_gb": cap} if cap else {}))
        metrics = launcher.run_cell(cell, tmp / "-".join(case), echo=False)
        out[case] = (cell, planner.predict(cell, facts, fixes=False), metrics.model_dump())
    return out


@pytest.fixture(scope="module")
def measured(model, tmp_path_factory):
    return _run(model, ACCURACY, tmp_path_factory.mktemp("accuracy"), caps=dict.fromkeys(FIT_CAP, CAP_GB))


@pytest.mark.parametrize("case", ACCURACY, ids="-".join)
def test_planned_memory_plus_the_runtime_baseline_is_within_15_percent_of_the_peak(measured, case):
    cell, plan, m = measured[case]
    assert m["outcome"] == "ok", m.get("error")
    planned = calibrate._comparable_memory(cell, plan, m)
    error = planned / m["peak_mem_gb"] - 1
    assert abs(error) <= TOLERANCE, (f"{case}: planned {planned:.3f} GB, measured {m['peak_mem_gb']:.3f} GB "
                                  f"(baseline {m['runtime_baseline_gb']:.3f}): {error:+.1%}; {plan.memory_gb}")


def test_the_predicted_out_of_memory_cells_are_the_ones_that_run_out(model, measured, tmp_path):
    over = _run(model, OVER_CAP, tmp_path, OVER_CAP_BATCH, caps=dict.fromkeys(OVER_CAP, CAP_GB))
    runs = {**{case: measured[case] for case in FIT_CAP}, **over}
    assert {cell.train.memory_cap_gb for cell, _, _ in runs.values()} == {CAP_GB}
    planned = {case: plan.peak_gb / CAP_GB for case, (_, plan, _) in runs.items()}
    assert all(abs(share - 1) > 0.1 for share in planned.values()), planned
    predicted = {case for case, (_, plan, _) in runs.items() if plan.verdict == "will not fit"}
    outcomes = {case: m["outcome"] for case, (_, _, m) in runs.items()}
    assert {case for case, outcome in outcomes.items() if outcome == "oom"} == predicted, (outcomes, planned)
    assert set(outcomes.values()) == {"ok", "oom"} and len(predicted) == 3, outcomes
