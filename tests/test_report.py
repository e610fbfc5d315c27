"""The report from a fixture table whose expected numbers are worked out by hand below.

The fixture: one model `m`, bf16-mixed, seq 512, accumulation 1, one node per cell.
  A/B/C  lora zero3 on p4d.24xlarge at 2/4/8 GPUs: 1000/1800/2400 tokens/s
  D      full zero3 p4d x2: out of memory
  E      qlora zero3 p4d x2: 12 GB, 500 tokens/s (LoRA: 20 GB, 1000 tokens/s)
  F      lora zero3 g5.12xlarge x2: same configuration as A on another instance type
  G1-3   lora ddp g5 x2, micro-batch 8 (global 16), lr 1e-4/2e-4/4e-4: val 1.5/1.2/1.3
  H1-3   lora ddp g5 x4 (global 32), lr 2e-4/4e-4/8e-4: val 1.4/1.1/1.25
  I, J   lora ddp g5 x2 at micro-batch 16 (fits, 30 GB) and 32 (out of memory)
  K, L   a hang (lora pipeline) and a refused cell (qlora tensor)
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from steps.plan import catalog
from steps.report import analysis, findings
from steps.report import build as report

P4D, G5 = 21.957642, 5.672  # $/h, configs/instances.yaml


def curve(slope: float, tokens_per_step: float, s_per_step: float, steps: int = 10) -> str:
    """loss = 3 - slope * step: a straight line, so the smoothed values are easy by hand."""
    return json.dumps([{"step": i, "loss": 3 - slope * i, "tokens": tokens_per_step, "time_s": s_per_step * i}
                       for i in range(1, steps + 1)])


def cell(name, peft, strategy, instance, ws, mb=4, lr=1e-4, outcome="ok", **m):
    return {"run_id": "r1", "cell_id": name, "outcome": outcome, "error": m.pop("error", None),
            "model": "m", "peft": peft, "strategy": strategy, "instance": instance, "nodes": 1,
            "gpus": ws, "world_size": ws, "lr": lr, "micro_batch": mb, "grad_accum": 1,
            "global_batch": mb * ws if strategy not in ("pipeline", "tensor") else mb,
            "precision": "bf16-mixed", "seq_len": 512, **m}


def ok(tps, mem, val, wall, train, tokens=1e6, step_s=0.5, **extra):
    return {"tokens_per_s": tps, "peak_mem_gb": mem, "val_loss": val, "wall_s": wall, "train_s": train,
            "train_tokens": tokens, "step_s": step_s, **extra}


G_TOK, I_TOK = 1000.0, 2000.0
ROWS = [
    cell("A", "lora", "zero3", "p4d.24xlarge", 2, **ok(1000, 20.0, 1.10, 120, 100)),
    cell("B", "lora", "zero3", "p4d.24xlarge", 4, **ok(1800, 12.0, 1.12, 70, 55)),
    cell("C", "lora", "zero3", "p4d.24xlarge", 8, **ok(2400, 8.0, 1.15, 50, 40)),
    cell("D", "full", "zero3", "p4d.24xlarge", 2, outcome="oom", wall_s=30.0, error="CUDA out of memory"),
    cell("E", "qlora", "zero3", "p4d.24xlarge", 2, **ok(500, 12.0, 1.11, 230, 200, step_s=1.0)),
    cell("F", "lora", "zero3", "g5.12xlarge", 2, **ok(500, 20.0, 1.10, 230, 200, step_s=1.0)),
    cell("G1", "lora", "ddp", "g5.12xlarge", 2, mb=8, lr=1e-4,
         **ok(800, 18.0, 1.5, 100, 90, tokens=10 * G_TOK, loss_curve=curve(0.10, G_TOK, 1.0))),
    cell("G2", "lora", "ddp", "g5.12xlarge", 2, mb=8, lr=2e-4,
         **ok(800, 18.0, 1.2, 100, 90, tokens=10 * G_TOK, loss_curve=curve(0.15, G_TOK, 1.0))),
    cell("G3", "lora", "ddp", "g5.12xlarge", 2, mb=8, lr=4e-4,
         **ok(800, 18.0, 1.3, 100, 90, tokens=10 * G_TOK, loss_curve=curve(0.12, G_TOK, 1.0))),
    cell("H1", "lora", "ddp", "g5.12xlarge", 4, mb=8, lr=2e-4, **ok(1500, 18.0, 1.4, 60, 48)),
    cell("H2", "lora", "ddp", "g5.12xlarge", 4, mb=8, lr=4e-4, **ok(1500, 18.0, 1.1, 60, 48)),
    cell("H3", "lora", "ddp", "g5.12xlarge", 4, mb=8, lr=8e-4, **ok(1500, 18.0, 1.25, 60, 48)),
    cell("I", "lora", "ddp", "g5.12xlarge", 2, mb=16, lr=2e-4,
         **ok(900, 30.0, 1.25, 100, 85, tokens=10 * I_TOK, loss_curve=curve(0.22, I_TOK, 2.0))),
    cell("J", "lora", "ddp", "g5.12xlarge", 2, mb=32, lr=2e-4, outcome="oom", wall_s=20.0),
    cell("K", "lora", "pipeline", "p4d.24xlarge", 2, outcome="hang", wall_s=950.0, stopped_after_steps=3,
         error="no progress for 900 s"),
    cell("L", "qlora", "tensor", "p4d.24xlarge", 2, outcome="skipped", wall_s=0.0,
         error="qlora with tensor parallelism: ..."),
]


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return analysis.prepare(pd.DataFrame(ROWS))


def by(df: pd.DataFrame, **where) -> pd.Series:
    rows = df
    for k, v in where.items():
        rows = rows[rows[k] == v]
    assert len(rows) == 1, (where, rows)
    return rows.iloc[0]


def test_catalog_prices_are_the_ones_used_by_hand():
    assert catalog.instances()["p4d.24xlarge"].price_per_hour_usd == P4D
    assert catalog.instances()["g5.12xlarge"].price_per_hour_usd == G5


def test_cost_per_run_and_per_million_tokens(table):
    a = by(table, cell_id="A")
    assert a.cost_usd == pytest.approx(120 / 3600 * P4D)  # 0.7319 $
    assert a.cost_per_mtok == pytest.approx(120 / 3600 * P4D / 1.0)  # 1M tokens trained
    g1 = by(table, cell_id="G1")
    assert g1.cost_per_mtok == pytest.approx(100 / 3600 * G5 / 0.01)  # 10,000 tokens
    assert by(table, cell_id="D").cost_usd == pytest.approx(30 / 3600 * P4D)  # an OOM costs too
    assert pd.isna(by(table, cell_id="L").cost_usd)  # never launched


def test_speedup_and_scaling_efficiency(table):
    s = analysis.scaling(table)
    z = s[(s.strategy == "zero3") & (s.peft == "lora") & (s.instance == "p4d.24xlarge")]
    assert list(z.world_size) == [2, 4, 8]
    assert list(z.speedup) == pytest.approx([1.0, 1.8, 2.4])  # 1800/1000, 2400/1000
    assert list(z.efficiency) == pytest.approx([1.0, 0.9, 0.6])  # 1.8/2, 2.4/4
    d = s[(s.strategy == "ddp") & (s.micro_batch == 8)]
    assert list(d.speedup) == pytest.approx([1.0, 1500 / 800])  # each at its best lr: G2 (1.2), H2 (1.1)
    assert list(d.efficiency) == pytest.approx([1.0, 1500 / 800 / 2])  # 0.9375
    assert list(z.cell_id) == ["A", "B", "C"] and list(d.cell_id) == ["G2", "H2"]  # a row is one cell
    assert len(s[s.peft == "qlora"]) == 0  # one GPU count, no single-GPU baseline: no row


def test_memory_and_throughput_of_the_methods(table):
    m = analysis.methods(table)
    assert list(m.peft) == ["full", "lora", "qlora"]  # full, then adapters, as the studies list them
    q, full = by(m, peft="qlora"), by(m, peft="full")
    assert q.mem_vs_lora == pytest.approx(12 / 20)  # 40% less
    assert q.tokens_per_s_vs_lora == pytest.approx(0.5)
    assert full.outcome == "oom" and pd.isna(full.peak_mem_gb)


def test_instances_time_and_cost(table):
    i = analysis.instances(table)
    p4d, g5 = by(i, instance="p4d.24xlarge"), by(i, instance="g5.12xlarge")
    assert (p4d.train_s, g5.train_s) == (100, 200)
    assert p4d.cost_usd == pytest.approx(120 / 3600 * P4D) and g5.cost_usd == pytest.approx(230 / 3600 * G5)
    totals = analysis.instance_totals(table).set_index("instance")
    # p4d: A, B, C, D, E, K ran (L was refused): 120+70+50+30+230+950 s
    assert totals.loc["p4d.24xlarge", "wall_s"] == 1450
    assert totals.loc["p4d.24xlarge", "cost_usd"] == pytest.approx(1450 / 3600 * P4D)
    assert (totals.loc["p4d.24xlarge", "cells"], totals.loc["p4d.24xlarge", "ok"]) == (7, 4)


def test_best_learning_rates_and_the_fitted_exponent(table):
    sweep = analysis.lr_sweep(table)
    best = sweep[sweep.best].set_index("global_batch")
    assert best.loc[16, "lr"] == 2e-4 and best.loc[32, "lr"] == 4e-4
    assert not best["at_edge"].any()  # both optima are inside the grid
    fit = analysis.lr_scaling(sweep).iloc[0]
    assert fit.exponent == pytest.approx(math.log(4e-4 / 2e-4) / math.log(32 / 16))  # = 1
    assert fit.closest_rule == "linear"


def test_batch_size_that_fits_and_loss_at_equal_tokens(table):
    fit = by(analysis.batch_fit(table), strategy="ddp", world_size=2)
    assert (fit.tried, fit.largest_ok, fit.first_failed, fit.failed_as) == ("8, 16, 32", 16, 32, "oom")
    assert fit.peak_mem_gb_at_largest == 30.0
    eq = analysis.equal_tokens(table).set_index(["global_batch", "lr"])
    assert set(eq.tokens) == {10 * G_TOK}  # the fewest tokens any of them trained on
    # G: 10,000 tokens is its last step: loss 3 - slope*10. I: 2,000/step, step 5 is the
    # only point in (9,000, 10,000]: 3 - 0.22*5.
    assert eq.loss_at_tokens.to_dict() == pytest.approx(
        {(16, 1e-4): 2.0, (16, 2e-4): 1.5, (16, 4e-4): 1.8, (32, 2e-4): 1.9})


def test_goodput_and_time_to_target(table):
    g = analysis.goodput(table).set_index("cell_id")
    # Target: the median of the final smoothed losses. Smoothed over 5 steps, a line's last
    # value is its value 2 steps earlier: G1 3-0.8=2.2, G2 1.8, G3 2.04, I 1.24 -> (1.8+2.04)/2.
    assert g.target_loss.dropna().unique().tolist() == pytest.approx([1.92])
    # First step whose smoothed loss (= loss 2 steps back, from step 5) <= 1.92:
    # G2 at 10 (3-0.15*8=1.8), I at 7 (3-0.22*5=1.9); G1 and G3 never do.
    assert (g.loc["G2", "steps_to_target"], g.loc["G2", "time_to_target_s"], g.loc["G2", "tokens_to_target"]) == (10, 10.0, 10000)
    assert (g.loc["I", "steps_to_target"], g.loc["I", "time_to_target_s"], g.loc["I", "tokens_to_target"]) == (7, 14.0, 14000)
    assert g.loc[["G1", "G3"], "time_to_target_s"].isna().all()
    assert g.loc["A", "updates_per_s"] == 2.0 and g.loc["A", "samples_per_s"] == 2 * 8  # global batch 8
    assert set(g.target_from) == {"median"}


def test_pareto_set_of_cost_time_and_loss(table):
    front = analysis.pareto(table)
    # H2: cheapest of the low-loss cells (60 s on g5 at val 1.1); C: the fastest (50 s).
    assert set(front[front.pareto].cell_id) == {"C", "H2"}
    assert len(front) == 12  # finished cells only


def test_findings_quote_the_numbers(table):
    """Each sentence names only what tells its rows apart (one model, one precision: never named).
    Noise: no two cells of one shape, so speed, time, cost and memory are judged against 2% a
    side; B and G1 are one equivalence class (lr 1e-4, global batch 16) that ended 0.38 apart in
    val loss, so no loss difference of this fixture is a finding."""
    found = findings.all_findings(report.sections(table), table)
    said = {f.text: f for f in found}
    key = [f.text for f in found if f.outside]
    assert key[:3] == ["4 of 16 cells did not finish (1 hang, 2 oom, 1 skipped); they are listed with their reasons "
                       "under 'Cells that did not finish'.",
                       "Full fine-tuning ran out of memory, where LoRA trained.",
                       "Largest micro-batch that fit: 16 (30.00 GB peak); micro-batch 32 ran out of memory."]
    # Then by effect: 2400/1000 - 1 = 1.4; the p4d's cost (0.7319 vs 0.3624) 1.02; time 200/100 - 1 = 1.0 ...
    assert key[3:5] == [
        "zero3 on 8 GPUs (micro-batch 4 on p4d.24xlarge) ran 2,400 tokens/s, 2.40x the throughput of zero3 x2: 60% "
        "scaling efficiency.",
        "p4d.24xlarge cost 2.02x as much as g5.12xlarge per run ($0.7319 vs $0.3624; $0.7319 vs $0.3624 per million "
        "tokens)."]
    assert [f.effect for f in found if f.outside][3:5] == pytest.approx([1.4, 0.7319 / 0.3624 - 1], rel=1e-3)
    assert "p4d.24xlarge trained 2.00x faster than g5.12xlarge (100.0 s vs 200.0 s)." in key
    assert "QLoRA used 40% less peak memory than LoRA (12.00 vs 20.00 GB)." in key  # no runtime baseline: the peak
    assert "QLoRA ran 0.50x the throughput of LoRA (500 vs 1,000 tokens/s)." in key
    assert ("Fastest to loss 1.92 on m: micro-batch 8 lr 0.0002 in 10.0 s (10,000 tokens), 1.40x sooner than the "
            "fastest of another shape, micro-batch 16 lr 0.0002 (14.0 s).") in key
    # Goodput compares updates of one size: global batch 8 is A (0.5 s/step) vs E (1 s/step).
    assert ("Highest goodput on m at global batch 8: lora at 2.00 updates/s (16.0 samples/s), 2.00x the lowest, "
            "qlora.") in key
    assert not said["Highest goodput on m at global batch 16: ddp x2 micro-batch 8 on g5.12xlarge at 2.00 updates/s "
                    "(32.0 samples/s), 1.00x the lowest, zero3 x4 micro-batch 4 on p4d.24xlarge."].outside  # 0.5 s/step
    loss = said["QLoRA ended at val loss 1.11 against 1.1 for LoRA (0.9% higher)."]
    assert (loss.outside, loss.effect, loss.noise) == (False, pytest.approx(0.01 / 1.1),
                                                       pytest.approx((0.38 + 0.38) / 1.1))
    assert not said["After the same 10,000 tokens, the best training loss of each global batch: global batch 16 "
                    "(lr 0.0002) 1.5; global batch 32 (lr 0.0002) 1.9."].outside
    assert "went as batch^1.00 (linear rule 1, square-root rule 0.5): closest to the linear rule." in "\n".join(said)
    assert not any("never reached" in t for t in said)  # the median target: half miss it by construction


def test_findings_need_finished_cells():
    """Only failures: no comparison sentence is made up."""
    rows = [cell("D", "full", "zero3", "p4d.24xlarge", 2, outcome="oom", wall_s=30.0),
            cell("E", "qlora", "zero3", "p4d.24xlarge", 2, outcome="oom", wall_s=31.0)]
    df = analysis.prepare(pd.DataFrame(rows))
    assert [f.text for f in findings.all_findings(report.sections(df), df)] == [
        "2 of 2 cells did not finish (2 oom); they are listed with their reasons under 'Cells that did not finish'."]


def test_report_files_show_every_cell(table, tmp_path):
    paths = report.write(pd.DataFrame(ROWS), tmp_path, {"matrix": "fixture", "run_id": "r1"})
    md = paths["report"].read_text()
    for heading in ("## Key findings", "## Results", "## Cells that did not finish", "## Scaling",
                    "## Methods: memory and throughput", "## Precision", "## Memory budget", "## Instance types: time and cost", "## Learning rate",
                    "## Batch size", "## Goodput and time to target", "## Loss curves",
                    "## Cost, time and loss: the Pareto set", "## How the numbers are defined"):
        assert heading in md
    assert "| m | qlora | tensor | p4d.24xlarge | 2 | bf16-mixed | 4 x 1 | 512 | 0.0001 | 4 | skipped |" in md
    assert "| K | hang | 3 |" in md
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "cost_vs_time.png", "loss_curves.png", "lr_sweep.png", "peak_memory.png", "throughput_vs_gpus.png"]
    for png in (tmp_path / "plots").iterdir():
        assert f"]({png.relative_to(tmp_path).as_posix()})" in md
    page = paths["html"].read_text()
    assert page.count("data:image/png;base64,") == 5 and "<script" not in page and "src=\"http" not in page


def test_command_line_joins_runs_by_cell_id(tmp_path):
    """Two runs (say a p3 run and a g5 run, or a run and the re-run of its failed cells):
    rows are joined by cell_id, a cell keeps its finished row from the latest run."""
    first = pd.DataFrame([r for r in ROWS if r["instance"] == "p4d.24xlarge"])
    second = pd.DataFrame([r for r in ROWS if r["instance"] == "g5.12xlarge"]
                          + [{**ROWS[3], "run_id": "r2"}])  # D again, out of memory again
    rerun = pd.DataFrame([{**ROWS[14], "run_id": "r3", "outcome": "ok", **ok(700, 15.0, 1.3, 90, 80)}])  # K finished
    (tmp_path / "p4d").mkdir()
    first.to_parquet(tmp_path / "p4d" / "results.parquet")
    (tmp_path / "p4d" / "provenance.json").write_text(json.dumps({"matrix": "study-p4d", "run_id": "r1"}))
    second.to_csv(tmp_path / "g5.csv", index=False)
    rerun.to_parquet(tmp_path / "rerun.parquet")

    assert report.main([str(tmp_path / "p4d"), str(tmp_path / "g5.csv"), str(tmp_path / "rerun.parquet"),
                        "--out", str(tmp_path / "out")]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# finetune-matrix report: study-p4d\n")
    assert "16 cells: 11 ok" not in md and "Run(s) `r1`, `r2`, `r3`; 16 cells: 13 ok, 2 oom, 1 skipped." in md
    df, _ = report.combine([report.read_results(p) for p in
                            (tmp_path / "p4d", tmp_path / "g5.csv", tmp_path / "rerun.parquet")])
    assert df.set_index("cell_id").loc["K", "run_id"] == "r3" and df.set_index("cell_id").loc["D", "run_id"] == "r2"
    assert report.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_memory_budget_by_hand():
    """llama-debug: hidden 64, 2 layers, 4 heads, vocabulary 259; 100,000 parameters of which
    4,000 train; micro-batch 4 x 32 tokens, fp32."""
    from steps.report import memory_budget

    row = {"peft": "lora", "precision": "fp32", "seq_len": 32, "micro_batch": 4, "total_params": 100_000,
           "trainable_params": 4_000, "strategy": "ddp", "world_size": 2}
    arch = catalog.model_presets()["llama-debug"].config
    # Per layer and token, fp32, PEFT's default targets (q_proj, v_proj), SDPA with a mask: two
    # norms' inputs (4h each) and their 1/rms, the adapted layers' shared input (4h); q, out,
    # repeated k and v (4h each), log-sum-exp (4 per head), the output again (4h); gate, SiLU,
    # up (4 x 192 each); lora_A's outputs (2 x 4 x r).
    layer = (2 * 4 * 64 + 8) + 4 * 64 + (4 * 4 * 64 + 4 * 4 + 4 * 64) + 3 * 4 * 192 + 2 * 4 * 8
    # Outside the layers: the loss (12 bytes per vocabulary entry), the mask, rotary cos and sin.
    outside = 12 * 259 + 32 + 8 * 16
    acts = (2 * layer + outside) * 32 * 4
    assert memory_budget.estimate(row, arch) == pytest.approx(
        {"weights": 96_000 * 4 + 4_000 * 4, "grads": 16_000, "optim": 32_000, "activations": acts})
    assert acts == 1_554_944
    fsdp = memory_budget.estimate({**row, "strategy": "fsdp"}, arch)
    assert (fsdp["weights"], fsdp["grads"], fsdp["optim"]) == (200_000, 8_000, 16_000)
    pipe = memory_budget.estimate({**row, "strategy": "pipeline"}, arch)
    assert sum(pipe.values()) == pytest.approx((400_000 + 16_000 + 32_000 + acts) / 2)
    q = memory_budget.estimate({**row, "peft": "qlora", "strategy": "single", "world_size": 1}, arch)
    dense = 259 * 64 * 2  # embedding and untied head: not quantized, fp32 after prepare_model_for_kbit_training
    assert q["weights"] == (96_000 - dense) * 0.5 + dense * 4 + 4_000 * 4
    # Mixed precision as PEFT users run it: a frozen base in bf16, adapters and their states in fp32;
    # full fine-tuning keeps fp32 master weights; bf16-true full stores everything in bf16.
    single = {**row, "strategy": "single", "world_size": 1}
    mixed = memory_budget.estimate({**single, "precision": "bf16-mixed"}, arch)
    assert (mixed["weights"], mixed["grads"], mixed["optim"]) == (96_000 * 2 + 4_000 * 4, 16_000, 32_000)
    full = {**single, "peft": "full", "trainable_params": 100_000}
    assert memory_budget.estimate({**full, "precision": "bf16-mixed"}, arch)["weights"] == 400_000
    true16 = memory_budget.estimate({**full, "precision": "bf16-true"}, arch)
    assert (true16["weights"], true16["grads"], true16["optim"]) == (200_000, 200_000, 400_000)
    offload = memory_budget.estimate({**row, "strategy": "zero3_offload"}, arch)
    assert (offload["weights"], offload["grads"], offload["optim"]) == (0, 8_000, 0)
    # DeepSpeed casts the module (adapters too) to bf16 under any 16-bit precision; its optimizer
    # keeps fp32 master weights and fp32 states, sharded from ZeRO-1 on.
    zero2 = memory_budget.estimate({**full, "strategy": "zero2", "world_size": 2, "precision": "bf16-mixed"}, arch)
    assert (zero2["weights"], zero2["grads"], zero2["optim"]) == (200_000, 100_000, 600_000)
    zero3 = memory_budget.estimate({**row, "strategy": "zero3", "precision": "bf16-true"}, arch)
    assert (zero3["weights"], zero3["grads"], zero3["optim"]) == (100_000, 4_000, 24_000)


def test_scaling_against_single_at_equal_global_batch():
    """Study 5's shape: every strategy trains global batch 16; single with micro-batch 16 is
    the baseline of ddp x2 with micro-batch 8 (strong scaling) when no single cell has 8."""
    rows = [cell("S", "lora", "single", "p4d.24xlarge", 1, mb=16, **ok(1000, 10.0, 1.0, 60, 50)),
            cell("D2", "lora", "ddp", "p4d.24xlarge", 2, mb=8, **ok(1500, 8.0, 1.0, 50, 40))]
    s = analysis.scaling(analysis.prepare(pd.DataFrame(rows)))
    d = by(s, strategy="ddp")
    assert (d.base, d.speedup, d.efficiency) == ("single x1 (micro-batch 16 x 1)", 1.5, 0.75)


def test_precision_comparison():
    """bf16-true against bf16-mixed on one configuration (study 4's 31.3 -> 20.1 GB)."""
    mixed = cell("P1", "full", "single", "p4de.24xlarge", 1, mb=8, **ok(11017, 31.3, 1.20, 45, 39.7))
    true = {**cell("P2", "full", "single", "p4de.24xlarge", 1, mb=8, **ok(12506, 20.1, 1.25, 40, 35.0)),
            "precision": "bf16-true"}
    df = analysis.prepare(pd.DataFrame([mixed, true]))
    p = analysis.precisions(df).set_index("precision")
    assert p.loc["bf16-true", "mem_vs_first"] == pytest.approx(20.1 / 31.3)
    assert p.loc["bf16-true", "tokens_per_s_vs_first"] == pytest.approx(12506 / 11017)
    assert [f.text for f in findings.precisions(analysis.precisions(df), findings.Noise(df))] == [
        "bf16-true used 36% less peak memory than bf16-mixed (20.10 vs 31.30 GB).",
        "bf16-true ran 1.14x the throughput of bf16-mixed (12,506 vs 11,017 tokens/s).",
        "bf16-true ended at val loss 1.25 against 1.2 for bf16-mixed (4.2% higher)."]
