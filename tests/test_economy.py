"""`economy:`: equivalence classes, one quality run per class on its cheapest member, speed
cells that share its validation, and divergence as a result; the plan without torch, then a
real flow (4 strategies x 2 learning rates in fp32, plus a cell whose loss blows up)."""

from __future__ import annotations

import io
import json
import math

import pytest

from steps.estimate import matrix_plan
from steps.plan import equivalence
from steps.plan.matrix import parse_matrix
from tests.conftest import make_cell

FAST = {
    "name": "economy", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp", "fsdp", "zero2"],
    "gpus": 2, "lr": [3e-3, 1e-2], "micro_batch": 4, "seq_len": 32,
    "exclude": [{"strategy": ["single"]}],
    "include": [{"strategy": "single", "gpus": 1, "micro_batch": 8}],  # the same global batch of 8
    "train": {"max_steps": 16, "timing_warmup_steps": 1, "timeout_s": 300, "diverge_factor": 3.0},
    "data": {"train_samples": 256, "val_samples": 32},
    "economy": {"speed_steps": 4},
}


def klass(**overrides) -> str:
    return equivalence.quality_class(make_cell(**overrides))


def test_class_keys_leave_out_the_strategy_instance_and_split_and_keep_what_changes_the_losses():
    base = klass()
    same = {
        "ddp over 2 ranks": klass(strategy="ddp", gpus=2, micro_batch=2),
        "accumulation": klass(micro_batch=2, grad_accum=2),
        "pipeline stages": klass(strategy="pipeline", gpus=2, micro_batch=2, grad_accum=2),
        "zero3 on 2 nodes": klass(strategy="zero3", nodes=2, micro_batch=2),
        "instance": klass(instance="local-cpu-2c"),
        "launcher and limits": klass(train={"launcher": "deepspeed", "timeout_s": 60, "hang_after_s": 30}),
        "evaluation and checkpoints": klass(train={"eval_every": 2, "checkpoint_every": 3, "save_adapter": False}),
        "fast paths": klass(train={"gradient_checkpointing": True, "loss": "chunked", "fused_optimizer": "on"}),
        "memory cap": klass(train={"memory_cap_gb": 8}),
    }
    assert {k: v for k, v in same.items() if v != base} == {}
    different = {
        "learning rate": klass(lr=2e-3),
        "global batch": klass(micro_batch=8),
        "seed": klass(train={"seed": 1}),
        "LoRA rank": klass(train={"lora": {"r": 16}}),
        "precision": klass(precision="bf16-mixed"),
        "steps": klass(train={"max_steps": 7}),
        "schedule": klass(train={"lr_schedule": "constant"}),
        "data seed": klass(data={"seed": 1}),
        "sequence length": klass(seq_len=64),
        "method": klass(peft="dora"),
    }
    assert sorted(k for k, v in different.items() if v == base) == []
    assert len(set(different.values())) == len(different)


def test_the_plan_trains_each_class_once_on_its_cheapest_member():
    spec = parse_matrix(FAST)
    planned, plan = matrix_plan.plan_spec(spec, check="never")
    roles = {p.cell.cell_id: p for p in planned}
    quality = [p for p in planned if p.role == "quality"]
    speed = [p for p in planned if p.role == "speed"]
    assert (len(quality), len(speed)) == (2, 6)
    for q in quality:  # the cheapest of its class, as the planner predicts it
        members = [p for p in planned if p.quality_class == q.quality_class]
        assert len(members) == 4 and {p.cell.lr for p in members} == {q.cell.lr}
        costs = {p.cell.cell_id: plan.plans[p.cell.cell_id].cost_usd for p in members}
        assert costs[q.cell.cell_id] == min(costs.values())
    for s in speed:
        assert roles[s.quality_from].role == "quality"
        assert roles[s.quality_from].quality_class == s.quality_class
        run = equivalence.run_spec(s.to_dict())
        assert (run.train.stop_after_steps, run.train.max_steps, run.train.evaluate, run.cell_id) == (
            4, 16, False, s.cell.cell_id)
        assert s.cell.train.max_steps == 16  # its settings stay the configuration's
    assert equivalence.run_spec(quality[0].to_dict()) == quality[0].cell
    saving = plan.saving
    assert (saving.quality_runs, saving.speed_cells) == (2, 6)
    steps = {p.cell.cell_id: plan.plans[p.cell.cell_id].step_s for p in planned}
    expected = sum(steps[p.cell.cell_id] * (4 if p.role == "speed" else 16) for p in planned)
    assert saving.train_s == pytest.approx(expected)
    assert saving.full_train_s == pytest.approx(16 * sum(steps.values()))
    out = io.StringIO()
    matrix_plan.show(planned, plan, out)
    text = out.getvalue()
    assert "economy: 2 equivalence classes, 2 cells trained to the end, 6 for their speed steps" in text
    assert f"({saving.ratio:.2f}x)" in text


def test_every_and_no_economy_train_every_cell_to_the_end():
    every = matrix_plan.plan_spec(parse_matrix({**FAST, "economy": {"quality": "every"}}), check="never")[0]
    assert {p.role for p in every} == {"quality"} and len(every) == 8
    none = matrix_plan.plan_spec(parse_matrix({k: v for k, v in FAST.items() if k != "economy"}), check="never")[0]
    assert {p.role for p in none} == {None}
    assert all("economy" not in p.to_dict() for p in none)


def test_speed_steps_must_leave_timed_steps():
    with pytest.raises(ValueError) as err:
        parse_matrix({**FAST, "economy": {"speed_steps": 1}})
    assert "economy.speed_steps: 1 leaves no timed step after train.timing_warmup_steps=1; allowed values: " \
           "more than 1" in str(err.value)


@pytest.fixture(scope="module")
def economy_run(tmp_path_factory):
    """The fast matrix in economy mode, plus one cell whose learning rate blows its loss up
    (full fine-tuning, plain SGD at lr 30 without clipping: 5.43 then 36.99 at step 2)."""
    from tests.test_flow import run_flow

    tmp = tmp_path_factory.mktemp("economy")
    matrix = {**FAST, "include": FAST["include"] + [
        {"strategy": "single", "gpus": 1, "micro_batch": 8, "peft": "full", "lr": 30.0,
         "train": {"optimizer": "sgd", "max_grad_norm": None}}]}
    status, pathspec, output = run_flow(tmp, matrix, max_workers=2)
    return status, pathspec, output, tmp


@pytest.mark.slow
def test_an_economy_run_trains_two_cells_to_the_end_and_shares_their_validation(economy_run):
    status, pathspec, output, _ = economy_run
    assert status == "successful", output[-4000:]
    from metaflow import Run, namespace

    namespace(None)
    df = Run(pathspec)["join"].task["results"].data
    grid = df[df["lr"] != 30.0].set_index("cell_id")
    assert len(grid) == 8 and set(grid["outcome"]) == {"ok"}
    assert sorted(grid["train_steps"]) == [4] * 6 + [16] * 2
    assert (grid["tokens_per_s"] > 0).all() and (grid["peak_mem_gb"] > 0).all()
    assert grid["val_loss"].map(math.isfinite).all()
    full = grid[grid["economy_role"] == "quality"]
    assert full["quality_from"].isna().all() and (full["train_steps"] == 16).all()
    for cell_id, r in grid[grid["economy_role"] == "speed"].iterrows():
        source = grid.loc[r["quality_from"]]
        assert source["economy_role"] == "quality" and source["lr"] == r["lr"]
        assert (r["val_loss"], r["accuracy"], r["loss_curve"]) == (
            source["val_loss"], source["accuracy"], source["loss_curve"]), cell_id
        # Its own 4 steps are the class's first 4 (fp32: within 1e-4 relative, the strategies' equivalence).
        own, shared = json.loads(r["speed_curve"]), json.loads(source["loss_curve"])[:4]
        assert [p["step"] for p in own] == [1, 2, 3, 4]
        assert [p["loss"] for p in own] == pytest.approx([p["loss"] for p in shared], rel=1e-4), cell_id


@pytest.mark.slow
def test_an_economy_report_states_the_saving_and_the_shared_numbers(economy_run):
    """The planner's saving from before launch is in the provenance; the report sets this run's
    device time against it and against the measured speed cells, says which numbers are shared,
    and puts the class's spread beside every shared validation loss."""
    status, pathspec, output, tmp = economy_run
    assert status == "successful", output[-4000:]
    from metaflow import Run, namespace

    from steps.report import analysis, economy

    namespace(None)
    join = Run(pathspec)["join"].task
    df, plan = join["results"].data, join["provenance"].data["economy_plan"]
    assert (plan["quality_runs"], plan["speed_cells"]) == (3, 6)  # the diverging cell trains for itself
    assert plan["ratio"] == pytest.approx(plan["train_s"] / plan["full_train_s"]) and plan["ratio"] < 1
    ran = df[df["outcome"] != "skipped"]
    device_s = float((ran["wall_s"] * ran["world_size"]).sum())
    speed = ran[ran["economy_role"] == "speed"]
    evals = ran.set_index("cell_id")["eval_s"]
    skipped = ((speed["total_steps"] - speed["train_steps"]) * speed["step_s"]
               + speed["quality_from"].map(evals)) * speed["world_size"]
    assert (speed["total_steps"] - speed["train_steps"] == 12).all()
    costs = economy.saving(analysis.prepare(df), {"economy_plan": plan}).set_index("quantity")
    d = costs.loc["device s"]
    assert d.this_run == pytest.approx(device_s) and d.full_measured == pytest.approx(device_s + skipped.sum())
    assert (d.planned, d.full_planned) == (plan["device_s"], plan["full_device_s"])
    report = (tmp / "reports" / pathspec.split("/")[1] / "report.md").read_text()
    section = report.split("## Economy: shared quality")[1].split("\n## ")[0]
    assert f"Device time: {d.this_run:,.1f} device-s against {d.full_measured:,.1f} device-s for every cell to the " \
           f"end as its speed cells measured it ({d.ratio_measured:.2f}x); as planned before launch, " \
           f"{d.planned:,.1f} device-s against {d.full_planned:,.1f} device-s ({d.ratio_planned:.2f}x)" in section
    assert "`economy:` trained 2 cells to the end, one per equivalence class of two or more members, and 6 " \
           "speed cells for 4 steps" in section
    classes = economy.classes(df)
    assert sorted(classes["speed_cells"]) == [3, 3] and (classes["spread_from"] != "this run").all()
    # fp32 classes: the curve gap over 4 steps is within the strategy tests' tolerance.
    assert (classes["curve_gap"] < 1e-4).all() and (classes["curve_steps"] == 4).all()
    results = report.split("## Results")[1].split("\n## ")[0]
    assert "| val loss | accuracy | quality from | class spread | wall s as run |" in results
    # Every table compares full runs: a speed cell's wall time is projected to its full run.
    prepared = analysis.prepare(df).set_index("cell_id")
    for cell_id, r in prepared[prepared["economy_role"] == "speed"].iterrows():
        extra = 12 * r["step_s"] + prepared.loc[r["quality_from"], "eval_s"]
        assert r["wall_s"] == pytest.approx(r["ran_wall_s"] + extra), cell_id
        assert r["cost_usd"] == pytest.approx(r["ran_cost_usd"] * r["wall_s"] / r["ran_wall_s"]), cell_id
    goodput = report.split("## Goodput and time to target")[1].split("\n## ")[0]
    assert "_Shared under `economy:`: 6 of 8 rows are speed cells: their time to target, tokens to target, steps " \
           "to target, val loss come from their class's quality run (time to target: the class's steps at the " \
           "cell's own step time)" in goodput


@pytest.mark.slow
def test_a_diverging_cell_is_a_result_without_a_retry(economy_run):
    status, pathspec, output, tmp = economy_run
    assert status == "successful", output[-4000:]
    from metaflow import Run, namespace

    namespace(None)
    run = Run(pathspec)
    df = run["join"].task["results"].data
    (row,) = df[df["lr"] == 30.0].itertuples()
    assert (row.outcome, row.diverged_at_step) == ("diverged", 2)
    assert f"at step {int(row.diverged_at_step)}" in row.error and "stopped as diverged" in row.error
    assert row.train_steps == row.diverged_at_step  # the curve so far is kept
    tasks = [t for t in run["train"] if t["cell"].data["cell_id"] == row.cell_id]
    assert len(tasks) == 1 and tasks[0].current_attempt == 0  # no retry
    report = (tmp / "reports" / pathspec.split("/")[1] / "report.md").read_text()
    failed = report.split("## Cells that did not finish")[1].split("\n## ")[0]
    assert "diverged at step" in failed and row.cell_id in failed and "diverged" in failed



def test_divergence_is_a_non_finite_loss_or_one_over_the_factor_after_the_warm_up():
    from steps.trainer.loop import Diverged, check_divergence

    cell = make_cell(train={"lr_warmup_steps": 3, "diverge_factor": 3.0})
    for step, loss in ((2, 100.0), (4, 14.9), (9, 15.0)):
        check_divergence(cell, step, loss, 5.0)  # in the warm-up, under the factor, at it
    for step, loss, why in ((1, math.nan, "is not finite"), (2, math.inf, "is not finite"),
                            (4, 15.01, "is over 3 x the first loss 5")):
        with pytest.raises(Diverged) as err:
            check_divergence(cell, step, loss, 5.0)
        assert err.value.step == step and why in str(err.value) and f"at step {step}" in str(err.value)
    off = make_cell(train={"diverge_factor": None})
    check_divergence(off, 5, 1e6, 5.0)
    with pytest.raises(Diverged):
        check_divergence(off, 5, math.nan, 5.0)
