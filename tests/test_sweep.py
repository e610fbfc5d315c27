"""Any train.* / data.* setting swept like an axis: expansion, validation, the results table
keeping every setting, and the report comparing along it (never pooling its values)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from steps.plan.matrix import expand, parse_matrix
from steps.plan.schema import ConfigError
from steps.report import analysis, findings, memory_budget
from steps.results import table
from steps.results.metrics import CellMetrics
from tests.conftest import make_cell

BASE = {"name": "sweep", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"],
        "gpus": 2, "lr": 1e-3, "micro_batch": 4, "seq_len": 32}


def _cells(**matrix):
    return [p.cell for p in expand(parse_matrix({**BASE, **matrix}))]


def test_a_swept_setting_multiplies_the_cells_like_an_axis():
    cells = _cells(sweep={"train.lora.r": [8, 16, 64], "train.optimizer": ["adamw", "sgd"]})
    assert [(c.strategy, c.train.lora.r, c.train.optimizer) for c in cells] == [
        (s, r, o) for s in ("single", "ddp") for r in (8, 16, 64) for o in ("adamw", "sgd")]
    assert len({c.cell_id for c in cells}) == 12
    assert cells[0].train.lora.alpha == 16  # the rest of the section is the matrix's


def test_a_single_value_and_a_whole_section_can_be_swept():
    cells = _cells(strategy="single", sweep={"train.gradient_checkpointing": True,
                                             "train.lora": [{"r": 8, "alpha": 16}, {"r": 32, "alpha": 64}]})
    assert [(c.train.gradient_checkpointing, c.train.lora.r, c.train.lora.alpha) for c in cells] == [
        (True, 8, 16), (True, 32, 64)]


def test_exclude_by_setting_and_include_adds_a_variant_beside_its_cell():
    """Study 4's 13B: full fine-tuning with AdamW (out of memory) and the same cell with SGD."""
    cells = _cells(sweep={"train.lora.r": [8, 16]},
                   exclude=[{"strategy": "ddp", "train.lora.r": 16}],
                   include=[{"strategy": "single", "sweep": {"train.optimizer": ["sgd"]}}])
    assert [(c.strategy, c.train.lora.r, c.train.optimizer) for c in cells] == [
        ("single", 8, "adamw"), ("single", 16, "adamw"), ("ddp", 8, "adamw"),
        ("single", 8, "sgd"), ("single", 16, "sgd")]


def test_an_include_without_sweep_still_changes_its_cell():
    cells = _cells(sweep={"train.lora.r": [8, 16]}, include=[{"strategy": "single", "train": {"seed": 3}}])
    assert [(c.strategy, c.train.lora.r, c.train.seed) for c in cells] == [
        ("single", 8, 3), ("single", 16, 3), ("ddp", 8, 0), ("ddp", 16, 0)]


def test_sweep_mistakes_name_the_key_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        parse_matrix({**BASE, "sweep": {"train.lora.rank": [8], "train.optimizer": ["adamw", "adam"],
                                        "train.lora.r": [0], "lr": [1e-3], "data.packing.on": [True]},
                      "exclude": [{"train.optimiser": "sgd"}]})
    assert err.value.problems == [
        "sweep.train.lora.rank: unknown setting (did you mean 'train.lora.r'?); allowed keys in train.lora: "
        "alpha, dropout, r, target_modules",
        "sweep.train.optimizer[1]: 'adam' is not allowed; allowed values: 'adamw', 'paged_adamw_8bit', 'sgd'",
        "sweep.train.lora.r[0]: 0 is invalid: input should be greater than 0",
        "sweep.lr: lr is an axis of the matrix: list its values under `lr:` instead",
        "sweep.data.packing.on: data.packing is one setting; it has no 'on'",
        "exclude[0].train.optimiser: unknown setting (did you mean 'train.optimizer'?); allowed keys in train: "
        + ", ".join(sorted(__import__("steps.plan.schema", fromlist=["TrainSettings"]).TrainSettings.model_fields)),
    ]


# ---------------------------------------------------------------- the table and the report

def _metrics(cell, tokens_per_s: float, val_loss: float, peak: float, **extra) -> dict:
    return CellMetrics(cell_id=cell.cell_id, outcome="ok", tokens_per_s=tokens_per_s, val_loss=val_loss,
                       peak_mem_gb=peak, train_s=10.0, wall_s=12.0, step_s=0.5, total_params=100_000,
                       trainable_params=4_000, loss_curve=[{"step": 1, "loss": 2.0, "tokens": 100.0, "time_s": 0.5}],
                       **extra).to_dict()


@pytest.fixture(scope="module")
def ranks() -> pd.DataFrame:
    """Two configurations (single, ddp x2), each at LoRA rank 8 and 16 and at two learning rates."""
    records = []
    for strategy, gpus, speed in (("single", 1, 1000.0), ("ddp", 2, 1800.0)):
        for r, mem in ((8, 1.0), (16, 1.2)):
            for lr, loss in ((1e-3, 2.0), (3e-3, 1.8)):
                cell = make_cell(strategy=strategy, gpus=gpus, lr=lr, train={"lora": {"r": r}})
                records.append((cell.model_dump(mode="json"), _metrics(cell, speed / (r / 8), loss - r / 100, mem)))
    return analysis.prepare(table.build_table("r1", records))


def test_the_table_keeps_every_setting_of_the_cell(ranks):
    assert ranks.columns[: len(table.COLUMNS)].tolist() == table.COLUMNS
    assert set(table.SETTINGS) <= set(ranks.columns)
    assert sorted(ranks["train.lora.r"].unique()) == [8, 16]
    assert ranks["train.lora.target_modules"].isna().all()  # unset: PEFT's default for the model
    assert ranks[ranks["train.lora.r"] == 16]["cell_id"].nunique() == 4
    assert analysis.varying_settings(ranks) == ["train.lora.r"]


def test_cells_that_differ_only_in_lora_rank_are_never_one_configuration(ranks):
    configs = [(key["strategy"], key["train.lora.r"], len(g)) for key, g in analysis.by_config(ranks)]
    assert configs == [("ddp", 8, 2), ("ddp", 16, 2), ("single", 8, 2), ("single", 16, 2)]
    sweep = analysis.lr_sweep(ranks)  # one learning-rate sweep per rank, not their median
    best = sweep[sweep.best].set_index(["strategy", "train.lora.r"])["val_loss"]
    assert best.to_dict() == pytest.approx({("ddp", 8): 1.72, ("ddp", 16): 1.64, ("single", 8): 1.72,
                                            ("single", 16): 1.64})
    scaling = analysis.scaling(ranks).set_index(["strategy", "train.lora.r"])
    assert scaling.loc[("ddp", 16), "speedup"] == pytest.approx(1.8)  # against single at rank 16
    assert scaling.loc[("ddp", 16), "tokens_per_s"] == pytest.approx(900.0)


def test_the_report_compares_along_the_swept_setting(ranks):
    s = analysis.settings(ranks)
    assert s[["strategy", "value", "peak_mem_gb", "mem_vs_first", "tokens_per_s", "tokens_per_s_vs_first"]].values.tolist() == [
        ["ddp", 8, 1.0, 1.0, 1800.0, 1.0], ["ddp", 16, 1.2, 1.2, 900.0, 0.5],
        ["single", 8, 1.0, 1.0, 1000.0, 1.0], ["single", 16, 1.2, 1.2, 500.0, 0.5]]
    assert set(s.setting) == {"train.lora.r"}
    said = [f.text for f in findings.settings(s, findings.Noise(ranks))]  # each at its best lr, 3e-3
    assert said[:3] == ["lora.r=16 used 20% more peak memory than lora.r=8 (1.20 vs 1.00 GB) on ddp x2.",
                        "lora.r=16 ran 0.50x the throughput of lora.r=8 (900 vs 1,800 tokens/s) on ddp x2.",
                        "lora.r=16 ended at val loss 1.64 against 1.72 for lora.r=8 (4.7% lower) on ddp x2."]
    # Every finding that names a configuration says its rank.
    text = "\n".join(f.text for f in findings.all_findings(
        __import__("steps.report.build", fromlist=["x"]).sections(ranks), ranks))
    assert "lora.r=8" in text and "lora.r=16" in text


def test_memory_budget_reads_the_cells_layout_and_optimizer():
    arch = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 259}
    row = {"peft": "full", "precision": "fp32", "seq_len": 32, "micro_batch": 4, "total_params": 100_000,
           "trainable_params": 100_000, "strategy": "hybrid", "world_size": 8}
    two = memory_budget.estimate({**row, "train.parallel.model_parallel": 2}, arch)
    four = memory_budget.estimate({**row, "train.parallel.model_parallel": 4}, arch)
    for part in ("weights", "grads", "optim", "activations"):
        assert four[part] == pytest.approx(two[part] / 2)  # by 4, not by 2 whatever was set
    assert four["weights"] == 400_000 / 4
    sgd = memory_budget.estimate({**row, "train.parallel.model_parallel": 4, "train.optimizer": "sgd"}, arch)
    assert sgd["optim"] == 0 and four["optim"] == 800_000 / 4
    checkpointed = memory_budget.estimate({**row, "strategy": "single", "world_size": 1,
                                           "train.gradient_checkpointing": True}, arch)
    # Full fine-tuning in fp32, checkpointed: each layer's input (4h), one layer rebuilt (norms
    # 8h each, q/k/v and gate/up inputs, down's, q, out, k, v and the output again, 3 MLP
    # tensors of 4h, with 1/rms and log-sum-exp), the loss, the mask, the final norm and head input.
    tokens = 32 * 4
    layer = (2 * 8 * 64 + 8) + 2 * 4 * 64 + 4 * 256 + (5 * 4 * 64 + 4 * 4) + 3 * 4 * 256
    outside = 12 * 259 + 32 + 8 * 64 + 4 * 64
    assert checkpointed["activations"] == (2 * 4 * 64 + layer + outside) * tokens == 1_453_568
    # A table from before these columns existed: the schema's defaults (AdamW, model_parallel 2).
    assert memory_budget.estimate({**row, "train.optimizer": math.nan}, arch) == two


@pytest.mark.slow
def test_a_lora_rank_sweep_runs_two_cells_per_configuration_and_the_report_compares_them(tmp_path):
    from tests.test_flow import SMALL, run_flow

    matrix = {**SMALL, "name": "rank-sweep", "lr": 1e-2, "repeats": 1, "sweep": {"train.lora.r": [8, 16]},
              "train": {**SMALL["train"], "max_steps": 8, "save_adapter": False}}
    status, pathspec, output = run_flow(tmp_path, matrix, max_workers=2)
    assert status == "successful", output[-4000:]
    run_id = pathspec.split("/")[-1]
    df = pd.read_parquet(tmp_path / "reports" / run_id / "results.parquet")
    assert sorted(zip(df["strategy"], df["train.lora.r"])) == [("ddp", 8), ("ddp", 16), ("single", 8), ("single", 16)]
    assert set(df["outcome"]) == {"ok"} and (df[df["train.lora.r"] == 16]["trainable_params"] == 2 * df[
        df["train.lora.r"] == 8]["trainable_params"].iloc[0]).all()
    report = (tmp_path / "reports" / run_id / "report.md").read_text()
    settings = report.split("## Settings")[1].split("\n## ")[0]
    rows = [line for line in settings.splitlines() if line.startswith("| llama-debug")]
    assert [r.split(" | ")[2:10] for r in rows] == [
        ["ddp", "local-cpu", "2", "fp32", "4 x 1", "32", "train.lora.r", "8"],
        ["ddp", "local-cpu", "2", "fp32", "4 x 1", "32", "train.lora.r", "16"],
        ["single", "local-cpu", "1", "fp32", "4 x 1", "32", "train.lora.r", "8"],
        ["single", "local-cpu", "1", "fp32", "4 x 1", "32", "train.lora.r", "16"]]
    # each row one cell, named in its last column
    assert [r.rstrip(" |").split(" | ")[-1] for r in rows] == list(
        df.sort_values(["strategy", "train.lora.r"])["cell_id"])
    # the rank compared in the findings (as a finding, or listed within the noise)
    findings_text = report.split("## Key findings")[1].split("\n## ")[0]
    assert "- lora.r=16 " in findings_text and "than lora.r=8" in findings_text
