"""The report's note on what a run cannot speak for (`steps/report/validity.py`), on tables built
for the purpose: a CPU twin of small random models gets every line with its cells' numbers; a GPU
run of a pretrained 7B model, long enough and uncapped, gets none; a busy cell is named wherever
it ran."""

from __future__ import annotations

import json

import pandas as pd

from steps.report import analysis, validity
from tests.conftest import REPO

TWIN = REPO / "tests" / "data" / "study_twins" / "study2-p4d-tensor-zero3-cpu"
FALLING = json.dumps([{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 3, "loss": 3.0}])
FLAT = json.dumps([{"step": 1, "loss": 5.0}, {"step": 2, "loss": 5.0}, {"step": 3, "loss": 4.99}])


def _cell(cell_id: str, **values) -> dict:
    row = {"cell_id": cell_id, "outcome": "ok", "instance": "p4d.24xlarge", "device": "NVIDIA A100-SXM4-40GB",
           "model": "llama-2-7b", "peft": "lora", "total_params": 6.78e9, "train.init": "auto", "total_steps": 500,
           "train_steps": 500, "world_size": 8, "precision": "bf16-mixed", "runtime_baseline_gb": 0.0,
           "peak_mem_gb": 21.5, "train.memory_cap_gb": None, "other_cpu_share": 0.03, "loss_curve": FALLING}
    return {**row, **values}


def _cpu_cell(cell_id: str, **values) -> dict:
    cpu = {"instance": "local-cpu", "device": "cpu (x86_64, 2 cores)", "model": "llama-debug", "total_params": 153_816,
           "total_steps": 20, "train_steps": 20, "world_size": 1, "precision": "fp32", "runtime_baseline_gb": 0.42,
           "peak_mem_gb": 0.46}
    return _cell(cell_id, **{**cpu, **values})


def test_a_cpu_run_of_small_random_models_says_what_does_not_transfer():
    df = pd.DataFrame([
        _cpu_cell("a", loss_curve=FLAT),
        _cpu_cell("b", world_size=2, precision="bf16-mixed", peak_mem_gb=0.69),
        _cpu_cell("c", model="llama-30m", total_params=30_682_624, world_size=4, runtime_baseline_gb=0.59,
                  peak_mem_gb=1.53, **{"train.memory_cap_gb": 1.6}),
        _cpu_cell("d", model="llama-30m", total_params=30_682_624, outcome="oom", runtime_baseline_gb=None,
                  peak_mem_gb=1.61, train_steps=1, **{"train.memory_cap_gb": 1.6}),
        _cpu_cell("e", outcome="skipped", total_params=None, world_size=8),  # refused: ran nothing
    ])
    assert validity.note(df) == (
        "## What this run can and cannot tell\n\n"
        "Every number below holds for this run as it ran; these comparisons do not carry over to the scale it "
        "stands in for (GPUs, pretrained models of 1B parameters or more, 100 optimizer steps or more, no memory "
        "cap):\n\n"
        "- **Memory ratios**: all 4 cells ran as CPU processes, whose resident set held 0.42-0.59 GB of libraries "
        "before the model (`runtime_baseline_gb`), against 0.04-0.94 GB for the training itself (`peak_mem_gb` "
        "minus it): ratios of whole peaks between cells shrink toward 1 and say nothing of a GPU's; compare peak "
        "minus baseline.\n"
        "- **Precision**: 1 of 4 cells ran bf16 on a CPU, where it is emulated unless the CPU has native bf16 "
        "units: their speed and memory against fp32 say nothing of a GPU's tensor cores.\n"
        "- **Strategy speed**: 2 of 4 cells ran 2-4 ranks as CPU processes sharing cores on a 2-core machine and "
        "talking over gloo: their scaling and the strategies' speed measure that, not GPUs over NVLink and NCCL.\n"
        "- **Speed at scale**: all 4 cells trained models of 0.154M-30.7M parameters (llama-debug, llama-30m), "
        "whose weights, activations and fixed per-step costs stand in other proportions than a 1B+ model's: "
        "speed and memory ratios between methods, strategies and precisions need not hold there.\n"
        "- **Learning rate and quality**: models of 0.154M-30.7M parameters; random weights; 20 optimizer steps "
        "(1 of 3 finished cells did not learn): they cannot learn what a pretrained 1B+ model would (LoRA least "
        "of all), so the best learning rate, the validation-loss ranking and the methods' quality do not carry "
        "over.\n"
        "- **OOMs**: 2 of 4 cells ran under a cap of 1.6 GB per process (`train.memory_cap_gb`); 1 of 2 capped "
        "cells ran out of memory (`d`): which configurations fit is the cap's answer, not a GPU's.")


def test_a_gpu_run_of_a_pretrained_7b_model_long_enough_gets_no_note():
    df = pd.DataFrame([_cell("a"), _cell("b", world_size=4), _cell("c", precision="fp32", outcome="oom")])
    assert validity.note(df) is None
    assert validity.blocks(df) == []


def test_a_busy_cell_is_named_even_in_a_run_that_speaks_for_its_target():
    df = pd.DataFrame([_cell("a"), _cell("b", other_cpu_share=0.25), _cell("c", other_cpu_share=0.61),
                       _cell("d", other_cpu_share=None)])
    assert validity.note(df) == (
        "## What this run can and cannot tell\n\n"
        "Every number below holds for this run as it ran; these comparisons do not carry over to the scale it "
        "stands in for (GPUs, pretrained models of 1B parameters or more, 100 optimizer steps or more, no memory "
        "cap) or were measured on a busy machine:\n\n"
        "- **Speed on a busy machine**: 1 of 4 cells ran while other processes used more than 25% of their cores "
        "(`other_cpu_share` 0.61): `c`. Their speed, time and cost measured the contention as well, and the "
        "calibration store leaves them out.")


def test_random_weights_are_named_only_where_the_table_tells():
    """`auto` resolves as the trainer does (the preset's default: llama-debug random, llama-2-7b
    pretrained); `random` is random whatever the model; a table without `train.init` cannot tell."""
    short = {"total_steps": 50}
    random_7b = pd.DataFrame([_cell("a", **short, **{"train.init": "random"})])
    assert "; random weights" not in validity.note(random_7b)
    assert "**Learning rate and quality**: random weights; 50 optimizer steps:" in validity.note(random_7b)
    pretrained = pd.DataFrame([_cell("a", **short)])
    assert "**Learning rate and quality**: 50 optimizer steps:" in validity.note(pretrained)
    untold = pd.DataFrame([_cell("a", **short, model="llama-debug")]).drop(columns=["train.init"])
    assert "**Learning rate and quality**: 50 optimizer steps:" in validity.note(untold)


def test_a_saved_twin_gets_the_note_with_its_own_numbers():
    """The study-2 twin as the report reads it: every cell a CPU process, the 1.6 GB cap and its
    one OOM."""
    text = validity.note(analysis.prepare(pd.read_parquet(TWIN / "results.parquet")))
    assert "- **Memory ratios**: all 10 cells ran as CPU processes, whose resident set held 0.42-0.59 GB" in text
    assert ("- **OOMs**: all 10 cells ran under a cap of 1.6 GB per process (`train.memory_cap_gb`); 1 of 10 "
            "capped cells ran out of memory (`llama-30m-full-zero3-1x1-34fa447dbe`)") in text
    assert "busy machine" not in text  # no cell of this twin ran contended
