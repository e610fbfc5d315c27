"""The contracts between the rooms: what the trainer writes (`CellMetrics`), the results table
built from it, and every name the cards, the analysis and the report read from them. A name
that is misspelt or dropped on one side fails here, not at report time."""

from __future__ import annotations

import json

import pytest

from steps.flow import cards, launcher
from steps.report import analysis
from steps.report.sections import FAILED_COLS, RESULTS_COLS
from steps.results import table
from steps.results.metrics import FIELDS, CellMetrics
from steps.results.nodes import gather
from tests.conftest import make_cell

# Columns the analysis adds to the table (prepare): the catalog price and the cost per token.
DERIVED = {"price_per_hour_usd", "cost_per_mtok"}


def full_metrics(cell) -> CellMetrics:
    """A finished cell with every name set."""
    return CellMetrics(
        cell_id=cell.cell_id, outcome="ok", world_size=1, dp_size=1, global_batch=4, data_source="synthetic",
        train_examples=256, val_examples=32, steps_per_epoch=64, total_steps=2, trainable_params=4_000,
        total_params=100_000, pipeline_schedule=None, resumed_from_step=None, device="cpu", versions={"torch": "x"},
        tokens_per_s=1000.0, tokens_per_s_per_device=1000.0, step_s=0.1, epoch_s=6.4, flops_per_token=6e5,
        achieved_tflops=6e-4, mfu=None, warmup={"steps": 1, "s": 0.2, "tokens_per_s": 500.0}, peak_mem_gb=1.2,
        peak_mem_gb_per_rank=[1.2], peak_reserved_gb_per_rank=None, val_loss=2.5, accuracy=0.5, token_accuracy=0.6,
        final_train_loss=2.4, loss_curve=[{"step": 1, "loss": 2.6, "lr": 1e-3, "tokens": 100.0, "time_s": 0.1},
                                          {"step": 2, "loss": 2.4, "lr": 1e-3, "tokens": 100.0, "time_s": 0.2}],
        val_curve=[{"step": 2, "time_s": 0.2, "val_loss": 2.5, "accuracy": 0.5, "token_accuracy": 0.6}],
        train_s=0.2, eval_s=0.05, epochs=2 / 64, wall_s=5.0, trainer_wall_s=4.0, exit_code=0, cores=[0],
        started_at=1.0, ended_at=6.0, node_rank=0, out_dir="/tmp/x", overhead_s=4.75, queued_s=0.0, cost_usd=0.01)


def test_an_undeclared_metric_cannot_be_written():
    m = CellMetrics(cell_id="c")
    with pytest.raises(ValueError, match="tokens_per_second"):
        m.update(tokens_per_second=1.0)
    with pytest.raises(ValueError, match="outcome"):
        m.outcome = "crashed"
    with pytest.raises(ValueError, match="does not match the metrics contract"):
        CellMetrics.from_dict({"cell_id": "c", "outcome": "ok", "tok_s": 3})


def test_metrics_json_round_trips(tmp_path):
    cell = make_cell()
    m = full_metrics(cell)
    assert m.write(tmp_path / "metrics.json")
    back = CellMetrics.read(tmp_path / "metrics.json")
    assert back == m and json.loads((tmp_path / "metrics.json").read_text())["loss_curve"][1]["loss"] == 2.4
    assert CellMetrics.read(tmp_path / "missing.json") is None
    (tmp_path / "torn.json").write_text('{"cell_id": "c", "outc')
    assert CellMetrics.read(tmp_path / "torn.json") is None  # cut short: none, the launcher reports the exit


def test_the_table_has_every_scalar_metric_and_every_setting():
    cell = make_cell(train={"lora": {"r": 16}})
    df = table.build_table("r1", [(cell.model_dump(mode="json"), full_metrics(cell).to_dict())])
    row = df.iloc[0]
    assert df.columns[: len(table.COLUMNS)].tolist() == table.COLUMNS
    for name in FIELDS:
        if name in ("versions", "warmup"):
            continue
        assert name in df.columns, name
    assert row["warmup_tokens_per_s"] == 500.0 and row["train_tokens"] == 200.0 and row["train_steps"] == 2
    assert json.loads(row["loss_curve"])[0] == {"step": 1, "loss": 2.6, "lr": 1e-3, "tokens": 100.0, "time_s": 0.1}
    assert json.loads(row["peak_mem_gb_per_rank"]) == [1.2]
    assert row["train.lora.r"] == 16 and row["data.task"] == "synthetic" and row["train.fault.kind"] is None
    assert set(table.SETTINGS) <= set(df.columns)


def test_every_name_the_report_and_the_cards_read_is_in_the_table():
    cell = make_cell()
    df = analysis.prepare(table.build_table("r1", [(cell.model_dump(mode="json"), full_metrics(cell).to_dict())]))
    known = set(df.columns) | DERIVED
    assert [c for c, _, _ in RESULTS_COLS + FAILED_COLS if c not in known] == []
    assert [c for c in analysis.NUMERIC if c not in known] == []
    assert [k for k, _ in cards.CARD_METRICS if k not in FIELDS] == []


def test_the_launcher_and_the_flow_fill_in_through_the_contract(tmp_path):
    cell = make_cell()
    skipped = launcher.skipped_metrics(cell, "no")
    assert (skipped.outcome, skipped.error, skipped.wall_s) == ("skipped", "no", 0.0)
    (tmp_path / "partial.jsonl").write_text(
        '{"curve": "loss_curve", "step": 1, "loss": 3.0, "lr": 0.001, "tokens": 64.0, "time_s": 0.5}\n'
        '{"curve": "val_curve", "step": 1, "time_s": 0.5, "val_loss": 3.1, "accuracy": null, "token_accuracy": 0.1}\n'
        '{"curve": "loss_curve", "step": 2, "lo')  # torn by the kill
    loss, val = launcher.read_partial(tmp_path / "partial.jsonl")
    assert [p.step for p in loss] == [1] and val[0].val_loss == 3.1
    node0 = full_metrics(cell).to_dict()
    m, log = gather([(1, CellMetrics(cell_id=cell.cell_id, outcome="error", error="lost").to_dict(), "b", None),
                     (0, node0, "a", None)])
    assert (m["outcome"], m["error"]) == ("error", "node 1 failed: lost") and log == "a\n===== node 1 =====\nb"
