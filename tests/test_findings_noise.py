"""Comparison rows and key findings on small tables whose answers are worked out by hand: a row is
one configuration at its best learning rate (one cell, or its repeats' mean), memory is training
memory, and a finding counts only where its difference exceeds the noise of both sides."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from steps.report import analysis, findings
from steps.report import build as report

FLAT = json.dumps([{"step": i, "loss": 2.0, "tokens": 100.0, "time_s": 0.5 * i} for i in (1, 2, 3)])


def row(name: str, peft: str = "lora", strategy: str = "ddp", lr: float = 1e-3, **m) -> dict:
    """A finished cell of model m, fp32, on local-cpu; `m` overrides any column."""
    ws = m.pop("world_size", 2)
    base = {"run_id": "r1", "cell_id": name, "outcome": "ok", "error": None, "model": "m", "peft": peft,
            "strategy": strategy, "instance": "local-cpu", "nodes": 1, "gpus": ws, "world_size": ws, "lr": lr,
            "micro_batch": 4, "grad_accum": 1, "global_batch": 4 * ws, "precision": "fp32", "seq_len": 128,
            "tokens_per_s": 1000.0, "peak_mem_gb": 1.0, "val_loss": 1.0, "wall_s": 60.0, "train_s": 50.0,
            "train_tokens": 1e5, "step_s": 0.5}
    return {**base, **m}


def prepared(*rows: dict) -> pd.DataFrame:
    return analysis.prepare(pd.DataFrame(list(rows)))


def found(df: pd.DataFrame) -> dict[str, findings.Finding]:
    return {f.text: f for f in findings.all_findings(report.sections(df), df)}


def test_a_row_is_one_cell_at_the_best_learning_rate():
    """lr 1e-3: 0.9 val loss at 900 tokens/s; 3e-3: 0.8 at 1,200; 1e-2: 0.7 but its training
    loss stayed flat (did not learn). The row is the 3e-3 cell: its loss and its speed."""
    df = prepared(row("a1", lr=1e-3, val_loss=0.9, tokens_per_s=900.0),
                  row("a2", lr=3e-3, val_loss=0.8, tokens_per_s=1200.0),
                  row("a3", lr=1e-2, val_loss=0.7, tokens_per_s=1500.0, loss_curve=FLAT))
    best = analysis.best_rows(df).iloc[0]
    assert (best.cell_id, best.lr, best.val_loss, best.tokens_per_s, best.repeats) == ("a2", 3e-3, 0.8, 1200.0, 1)
    assert df.set_index("cell_id").loc["a3", "learned"] == "no: training loss 2 against 2 at its first step"
    # where none learned, the lowest loss of all; where none has a loss, the fastest
    assert analysis.best_lr(df[df.cell_id == "a3"]) == 1e-2
    assert analysis.best_lr(df.assign(val_loss=float("nan"), learned="yes")) == 1e-2


def test_a_configurations_repeats_are_averaged_and_its_seed_is_no_setting():
    df = prepared(*(row(f"r{i}", lr=1e-3, val_loss=v, tokens_per_s=t, repeat=i, **{"train.seed": i})
                    for i, (v, t) in enumerate([(1.0, 1000.0), (1.2, 1100.0)])),
                  row("x", lr=3e-3, val_loss=1.5, tokens_per_s=1200.0, repeat=0, **{"train.seed": 0}))
    assert analysis.varying_settings(df) == []
    best = analysis.best_rows(df).iloc[0]
    assert (best.lr, best.val_loss, best.tokens_per_s) == (1e-3, pytest.approx(1.1), pytest.approx(1050.0))
    assert (best.members, best.repeats, best.cell) == (("r0", "r1"), 2, "r0 (mean of 2)")


def test_methods_compare_training_memory():
    """Study 1's QLoRA 'used 11% more peak memory' was the bitsandbytes import: with the runtime's
    baseline taken off, 0.043 vs 0.040 GB of training memory."""
    lora = row("l", peak_mem_gb=0.461, runtime_baseline_gb=0.421, tokens_per_s=1000.0)
    qlora = row("q", peft="qlora", peak_mem_gb=0.510, runtime_baseline_gb=0.467, tokens_per_s=1000.0)
    df = prepared(lora, qlora)
    assert df["train_mem_gb"].tolist() == pytest.approx([0.040, 0.043])
    m = analysis.methods(df).set_index("peft")
    assert m.loc["qlora", "mem_vs_lora"] == pytest.approx(0.043 / 0.040)
    said = [f.text for f in findings.methods(analysis.methods(df), findings.Noise(df))]
    assert said[0] == "QLoRA used 7.5% more training memory than LoRA (0.043 vs 0.04 GB)."
    # without a baseline on one side: the peaks, and the sentence says so
    bare = prepared(lora, {**qlora, "runtime_baseline_gb": None})
    assert findings.methods(analysis.methods(bare), findings.Noise(bare))[0].text == (
        "QLoRA used 11% more peak memory than LoRA (0.51 vs 0.461 GB).")


def test_an_oom_under_a_cap_says_the_cap():
    df = prepared(row("l", **{"train.memory_cap_gb": 1.5}),
                  row("f", peft="full", outcome="oom", val_loss=None, tokens_per_s=None,
                      **{"train.memory_cap_gb": 1.5}))
    assert [f.text for f in findings.methods(analysis.methods(df), findings.Noise(df))] == [
        "Full fine-tuning ran out of memory under a 1.5 GB cap, where LoRA trained."]


def test_a_loss_difference_inside_the_class_spread_is_no_finding():
    """Study 3's 'val loss 0.9972 vs 0.9957': the saved twins' bf16 spread is 2.2e-3, fp32's
    1.3e-4 (floored at 0.1% of the loss), so 0.0015 apart is inside 0.0022 + 0.0010. Each side
    also used 0.2 GB more memory than the other's 2% noise allows: that one is a finding."""
    df = prepared(row("f", val_loss=0.9957), row("b", precision="bf16-mixed", val_loss=0.9972, peak_mem_gb=1.2))
    said = found(df)
    loss = said["bf16-mixed ended at val loss 0.9972 against 0.9957 for fp32 (0.2% higher)."]
    assert (loss.outside, loss.effect) == (False, pytest.approx(0.0015 / 0.9957))
    assert loss.noise == pytest.approx((0.0022335947 + 0.9957e-3) / 0.9957)
    assert said["bf16-mixed used 20% more peak memory than fp32 (1.20 vs 1.00 GB)."].outside
    md = findings.section(list(said.values()))
    key, within = md.split("Within the noise")
    assert "val loss 0.9972" not in key and "- bf16-mixed ended at val loss 0.9972" in within
    assert "- bf16-mixed used 20% more peak memory than fp32 (1.20 vs 1.00 GB)." in key


def test_this_runs_class_spread_is_the_loss_noise():
    """single x1 at micro-batch 8 and ddp x2 at 4 train the same global batch 8: one class, which
    ended 0.004 apart; so the single cell at micro-batch 4 (batch 4) 0.003 off is noise."""
    df = prepared(row("s8", strategy="single", world_size=1, micro_batch=8, global_batch=8, val_loss=1.000),
                  row("d4", val_loss=1.004),
                  row("s4", strategy="single", world_size=1, val_loss=1.007, global_batch=4))
    noise = findings.Noise(df)
    assert noise.loss["fp32"] == pytest.approx(0.004)  # this run's, over the twins' 1.3e-4
    assert not findings.judged("", "val loss", {"val_loss": 1.007, "precision": "fp32"},
                               {"val_loss": 1.004, "precision": "fp32"}, "val_loss", noise).outside


def test_a_speed_difference_between_cells_differing_only_in_lr_is_no_finding():
    """`make run`: two learning rates of one shape, 1,440 vs 1,000 tokens/s. The lr cannot
    change a step's time: never a goodput or throughput finding, and the noise of this run's
    speed is that 44% spread."""
    df = prepared(row("a", lr=1e-3, tokens_per_s=1000.0, step_s=0.72, val_loss=1.0),
                  row("b", lr=3e-3, tokens_per_s=1440.0, step_s=0.5, val_loss=0.9))
    noise = findings.Noise(df)
    assert noise.same_shape("a", "b") and noise.relative("tokens_per_s") == pytest.approx(440 / 1220)
    every = set(df["cell_id"])  # even offered both cells, goodput does not compare them
    assert findings.goodput(analysis.goodput(df), noise, every) == []
    assert not [f for f in found(df).values() if f.quantity in ("throughput", "goodput") and f.outside]


def test_findings_are_ranked_by_effect_and_ten_are_key():
    made = [findings.Finding(f"d{i}", "throughput", e, 0.05, True) for i, e in enumerate([0.1, 0.9, 0.3, 0.5, 0.2,
                                                                                          0.7, 0.4, 0.6, 0.8, 1.0,
                                                                                          1.1, 0.15])]
    made += [findings.Finding("noise", "val loss", 2.0, 3.0, False), findings.failure("2 of 9 cells did not finish.")]
    ranked = findings.rank(made)
    assert [f.text for f in ranked] == ["2 of 9 cells did not finish.", "d10", "d9", "d1", "d8", "d5", "d7", "d3",
                                        "d6", "d2", "d4", "d11", "d0", "noise"]
    md = findings.section(ranked, lead=["Economy saved 3x."])
    bullets = md.split("\n\n")[2].splitlines()
    assert bullets[0] == "- Economy saved 3x." and len(bullets) == 1 + findings.TOP
    assert bullets[1:] == [f"- {f.text}" for f in ranked[:10]]
    assert "Beyond the first 10, outside the noise too, largest first:\n\n- d4\n- d11\n- d0\n\n" in md
    assert md.endswith("Within the noise, so not findings (the data cannot tell these apart), largest first:\n\n"
                       "- noise (200.0% apart, within a noise of 300.0%)")


def test_a_cell_that_did_not_learn_is_out_of_the_pareto_set():
    """'flat' is the cheapest and fastest but its loss never fell: not a Pareto cell. Per model,
    the set is ranked by val loss."""
    df = prepared(row("good", lr=1e-3, val_loss=1.0, wall_s=60.0),
                  row("fast", lr=3e-3, val_loss=1.2, wall_s=30.0),
                  row("flat", lr=1e-2, val_loss=0.9, wall_s=10.0, loss_curve=FLAT),
                  row("other", model="n", val_loss=3.0, wall_s=5.0))
    front = analysis.pareto(df)
    assert "flat" not in set(front["cell_id"])
    assert front[["model", "cell_id", "pareto", "rank"]].values.tolist() == [
        ["m", "good", True, 1.0], ["m", "fast", True, 2.0], ["n", "other", True, 1.0]]
    assert "no: training loss" in analysis.cells(df).set_index("cell_id").loc["flat", "learned"]
    goodput = analysis.goodput(df).set_index("cell_id")
    assert goodput.loc["flat", "learned"].startswith("no")


def test_a_sentence_names_only_what_differs_between_its_rows():
    """Study 4 named 'optimizer=adamw' in every sentence and never the sequence length: here the
    optimizer is one value and the two configurations differ in seq_len."""
    df = prepared(*(row(f"{p}{s}", peft=p, seq_len=s, tokens_per_s=t, **{"train.optimizer": "adamw"})
                    for p, s, t in [("lora", 128, 1000.0), ("qlora", 128, 500.0), ("lora", 256, 800.0),
                                    ("qlora", 256, 400.0)]))
    said = [f.text for f in findings.methods(analysis.methods(df), findings.Noise(df)) if f.quantity == "throughput"]
    assert said == ["QLoRA ran 0.50x the throughput of LoRA (500 vs 1,000 tokens/s) on seq 128.",
                    "QLoRA ran 0.50x the throughput of LoRA (400 vs 800 tokens/s) on seq 256."]
    assert findings.where(df.iloc[0], findings.differing(df)) == "lora seq 128"
    assert math.isinf(findings.failure("x").effect)
