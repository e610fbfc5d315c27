"""The decision per goal, on results tables whose answers are known: the study-5 twin's five
strategies (one equivalence class: their validation losses must end equal, and end 2.2e-3 apart
in bf16), changed where a case needs a failure, a constraint or a flat curve."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from steps.plan.matrix import parse_matrix
from steps.plan.schema import ConfigError, Goal
from steps.report import analysis, decision
from tests.conftest import REPO

# Results tables kept as they were measured (the study-5 and study-3 twins' runs of 2026-12-03), so
# that the known answers below stay known when the twins are measured again.
TABLES = REPO / "tests" / "data" / "decision"
TWIN = TABLES / "study5-twin"
IDS = {"ddp": "llama-debug-lora-ddp-1x2-6113d27065", "single": "llama-debug-lora-single-1x1-fcd4628956",
       "tensor": "llama-debug-lora-tensor-1x2-561598ea6b", "pipeline": "llama-debug-lora-pipeline-1x2-84acffbafb",
       "hybrid": "llama-debug-lora-hybrid-1x4-afcef5753e"}


@pytest.fixture
def twin() -> pd.DataFrame:
    return analysis.prepare(pd.read_parquet(TWIN / "results.parquet"))


def _one(df: pd.DataFrame, goal: Goal) -> dict:
    (record,) = decision.decide(df, [goal])
    return record


def test_cells_that_must_end_equal_are_tied_on_validation_loss(twin):
    """Five strategies of one class: 4.383934 to 4.386168, a spread this run measured (2.2e-3);
    the lowest is the choice and every other is tied with it, not ranked below it."""
    rec = _one(twin, Goal(name="q", minimize="val_loss"))
    assert rec["choice"] == IDS["single"] and rec["value"] == pytest.approx(4.383934, abs=1e-6)
    assert sorted(rec["tied_with"]) == sorted(IDS[s] for s in ("ddp", "tensor", "pipeline", "hybrid"))
    assert rec["excluded"] == {} and rec["candidates"] == 5
    spread = max(4.386168 - 4.383934, decision.MIN_LOSS_EFFECT * rec["value"])  # 0.1% of 4.38 here
    assert rec["interval"] == pytest.approx([rec["value"] - spread, rec["value"] + spread], abs=1e-5)
    assert rec["noise"].startswith("the validation-loss spread of this run's equivalence classes")
    (text,) = decision.sentences([rec], twin)
    # named by what differs among the five: strategy, ranks and the batch split
    assert text.startswith("**q** (minimize validation loss): single x1 micro-batch 16 grad-accum 1, validation loss "
                           "4.3839 (interval 4.3796 to 4.3883). Tied within the noise with ddp x2 micro-batch 8 "
                           "grad-accum 1; tensor x2 micro-batch 8 grad-accum 2;")
    assert text.endswith("hybrid x4 micro-batch 4 grad-accum 2: the data cannot tell them apart.")


def test_a_constraint_excludes_the_fastest_and_a_small_speed_difference_is_a_tie(twin):
    """ddp is the fastest (9,675 tokens/s) but holds 0.677 GB; under 0.6 GB the choice is pipeline
    (7,167), and single (7,069: 1.4% slower, under the 2% minimum effect) is tied with it."""
    rec = _one(twin, Goal(name="fast", maximize="tokens_per_s", max_mem_gb=0.6))
    assert rec["excluded"] == {IDS["ddp"]: "0.677 GB of peak memory, over max_mem_gb 0.6",
                               IDS["tensor"]: "0.731 GB of peak memory, over max_mem_gb 0.6"}
    assert rec["choice"] == IDS["pipeline"] and rec["tied_with"] == [IDS["single"]]
    assert rec["runner_up"] == IDS["single"] and rec["margin"] == pytest.approx(7166.785 - 7068.843, rel=1e-4)
    assert rec["noise"].startswith("±2%: the minimum effect")


def test_a_maximized_objective_picks_the_largest_and_states_the_margin(twin):
    rec = _one(twin, Goal(name="fast", maximize="tokens_per_s"))
    assert rec["direction"] == "maximize" and rec["choice"] == IDS["ddp"] and rec["tied_with"] == []
    assert rec["runner_up"] == IDS["pipeline"]
    margin = 9675.114521 - 7166.785132
    assert rec["margin"] == pytest.approx(margin, rel=1e-6)  # positive: how much better the choice is
    width = 0.02 * (9675.114521 + 7166.785132)
    assert rec["margin_interval"] == pytest.approx([margin - width, margin + width], rel=1e-6)


def test_failed_diverged_and_non_learning_cells_are_excluded_with_their_reasons(twin):
    df = twin.copy()
    at = {s: df.index[df["cell_id"] == i][0] for s, i in IDS.items()}
    df.loc[at["ddp"], ["outcome", "error"]] = ["diverged", "loss 14.2 is over 3x the first (4.6) at step 31"]
    df.loc[at["tensor"], ["outcome", "error"]] = ["oom", "out of memory: 0.8 GB > memory_cap_gb 0.5"]
    flat = [dict(p, loss=5.0) for p in json.loads(df.loc[at["hybrid"], "loss_curve"])]
    df.loc[at["hybrid"], "loss_curve"] = json.dumps(flat)
    df.loc[at["pipeline"], "accuracy"] = 0.48  # the majority task: chance is one half
    rec = _one(df, Goal(name="q", minimize="val_loss"))
    assert rec["excluded"] == {
        IDS["ddp"]: "diverged: loss 14.2 is over 3x the first (4.6) at step 31",
        IDS["tensor"]: "oom: out of memory: 0.8 GB > memory_cap_gb 0.5",
        IDS["hybrid"]: "did not learn: training loss 5 against 5 at its first step",
        IDS["pipeline"]: "did not learn: accuracy 48.0%, no better than chance (50%)"}
    assert rec["choice"] == IDS["single"] and rec["tied_with"] == [] and rec["runner_up"] is None
    (text,) = decision.sentences([rec], df)
    assert text.endswith("Excluded: 1 diverged, 1 oom, 2 did not learn.")


def test_a_goal_no_cell_meets_has_no_choice_and_lists_every_exclusion(twin):
    rec = _one(twin, Goal(name="tiny", minimize="cost_usd", max_mem_gb=0.1))
    assert rec["choice"] is None and rec["value"] is None and rec["tied_with"] == []
    assert sorted(rec["excluded"]) == sorted(IDS.values())
    assert all("GB of peak memory, over max_mem_gb 0.1" in why for why in rec["excluded"].values())
    (text,) = decision.sentences([rec], twin)
    assert text == "**tiny** (minimize cost, max_mem_gb 0.1): no cell qualifies. Excluded: 5 broke a constraint."


def test_time_and_cost_to_a_goal_s_own_target_come_from_the_curves(twin):
    """A target every cell reaches early: the time is the training time at the step the smoothed
    loss first reached it, as the report's goodput section reads it."""
    first = min(json.loads(c)[0]["loss"] for c in twin["loss_curve"])
    rec = _one(twin, Goal(name="t", minimize="time_to_target_s", target_loss=first))
    assert rec["excluded"] == {} and rec["target_loss"] == {"llama-debug": first}
    times = {c: analysis.reach(analysis.curve(r), first)["time_s"] for c, r in twin.set_index("cell_id").iterrows()}
    assert rec["value"] == pytest.approx(min(times.values()))
    cost = _one(twin, Goal(name="c", minimize="cost_to_target_usd", target_loss=first))
    row = twin.set_index("cell_id").loc[cost["choice"]]
    assert cost["value"] == pytest.approx(times[cost["choice"]] * row["cost_usd"] / row["wall_s"])


def test_goals_are_validated_with_the_allowed_values():
    base = {"name": "g", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3}
    with pytest.raises(ConfigError) as err:
        parse_matrix({**base, "goals": [{"name": "a", "minimize": "speed"}, {"name": "b"},
                                        {"name": "a", "maximize": "tokens_per_s", "max_memory": 3}]})
    problems = err.value.problems
    assert problems[0].startswith("goals[0].minimize: 'speed' is not allowed; allowed values: 'val_loss', ")
    assert "goals[1]: " in problems[1] and "a goal has one objective: set minimize or maximize" in problems[1]
    assert problems[2] == ("goals[2].max_memory: unknown key (did you mean 'max_mem_gb'?); allowed keys: max_cost_usd, "
                           "max_mem_gb, max_val_loss, max_wall_s, maximize, min_accuracy, minimize, name, target_loss")
    with pytest.raises(ConfigError) as err:
        parse_matrix({**base, "goals": [{"name": "a", "minimize": "val_loss"}, {"name": "a", "minimize": "wall_s"}]})
    assert "goal names must differ: a appear(s) more than once" in str(err.value)
    spec = parse_matrix({**base, "goals": [{"name": "cheap", "minimize": "cost_usd", "max_val_loss": 1.3}]})
    assert spec.goals[0].objective == "cost_usd" and spec.goals[0].constraints() == {"max_val_loss": 1.3}


@pytest.mark.slow  # two report commands in subprocesses (pandas, matplotlib): seconds
def test_the_report_command_rebuilds_decision_json_from_results_tables(tmp_path):
    """From saved run folders alone, one run or several; the report opens with the decision."""
    proc = subprocess.run([sys.executable, "-m", "steps.report", str(TWIN), "--out", str(tmp_path / "one")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    goals = json.loads((tmp_path / "one" / "decision.json").read_text())["goals"]
    keys = {"name", "objective", "direction", "constraints", "default", "choice", "value", "interval", "runner_up",
            "margin", "margin_interval", "tied_with", "excluded", "noise", "candidates"}
    assert [g["name"] for g in goals] == [g.name for g in decision.DEFAULT_GOALS]
    assert all(keys <= set(g) for g in goals) and goals[0]["choice"] == IDS["single"]
    report = (tmp_path / "one" / "report.md").read_text()
    assert [h for h in report.splitlines() if h.startswith("## ")][0] == "## Decision"
    other = TABLES / "study3-twin"
    proc = subprocess.run([sys.executable, "-m", "steps.report", str(TWIN), str(other), "--out", str(tmp_path / "two")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    both = json.loads((tmp_path / "two" / "decision.json").read_text())["goals"]
    # two models (study 3 has llama-30m too): a decision per goal and model
    assert [(g["name"], g["model"]) for g in both[:2]] == [("best-quality", "llama-debug"), ("best-quality", "llama-30m")]
    both = both[0]
    # study 3's twin trained too few steps to learn its task (accuracy 0%): its 10 llama-debug cells are excluded
    assert both["candidates"] == 5 and len(both["excluded"]) == 10 and both["choice"] == IDS["single"]
    assert set(both["excluded"].values()) == {"did not learn: accuracy 0.0%, no better than chance (50%)"}


def _repeats(twin: pd.DataFrame, values: dict[str, list[float]], column: str) -> pd.DataFrame:
    """Three repeats of the twin's single and ddp cells (seeds 0, 1, 2), `column` set per repeat."""
    rows = []
    for strategy, per in values.items():
        base = twin[twin["cell_id"] == IDS[strategy]].iloc[0]
        for repeat, value in enumerate(per):
            rows.append(base.copy())
            rows[-1]["cell_id"] = f"{IDS[strategy]}-r{repeat}"
            rows[-1]["repeat"], rows[-1]["train.seed"], rows[-1][column] = repeat, repeat, value
    return pd.DataFrame(rows).reset_index(drop=True)


def test_with_repeats_configurations_compete_on_their_means(twin):
    """tokens/s 100, 101, 99 against 120, 121, 119: ddp (mean 120) is chosen, 20 ahead; each mean's
    95% interval is t(2) x 1/sqrt(3) = 2.484, the margin's Welch t(4) x sqrt(2/3) = 2.267."""
    df = _repeats(twin, {"single": [100, 101, 99], "ddp": [120, 121, 119]}, "tokens_per_s")
    rec = _one(df, Goal(name="fast", maximize="tokens_per_s"))
    assert rec["choice"] == f"{IDS['ddp']}-r0" and rec["repeats"] == 3 and rec["candidates"] == 2
    assert rec["choice_cells"] == [f"{IDS['ddp']}-r{i}" for i in range(3)]
    assert rec["value"] == pytest.approx(120) and rec["interval"] == pytest.approx([117.516, 122.484], abs=1e-3)
    assert rec["tied_with"] == [] and rec["runner_up"] == f"{IDS['single']}-r0"
    assert rec["margin"] == pytest.approx(20) and rec["margin_interval"] == pytest.approx([17.733, 22.267], abs=1e-3)
    assert rec["noise"].startswith("the 95% interval of the mean over each configuration's repeats")
    (text,) = decision.sentences([rec], df)
    assert text.startswith("**fast** (maximize tokens/s): ddp x2 micro-batch 8, tokens/s mean of 3 repeats 120 "
                           "(interval 117.52 to 122.48). Ahead of single x1 micro-batch 16 by 20"), text


def test_with_repeats_a_difference_inside_the_seeds_spread_is_a_tie(twin):
    """Validation losses 1.00, 1.02, 0.98 against 1.01, 0.99, 1.03: 0.01 apart, Welch p = 0.57."""
    df = _repeats(twin, {"single": [1.00, 1.02, 0.98], "ddp": [1.01, 0.99, 1.03]}, "val_loss")
    rec = _one(df, Goal(name="q", minimize="val_loss"))
    assert rec["choice"] == f"{IDS['single']}-r0" and rec["tied_with"] == [f"{IDS['ddp']}-r0"]
    assert rec["margin"] == pytest.approx(0.01) and rec["margin_interval"][0] < 0 < rec["margin_interval"][1]


def test_with_repeats_one_failed_repeat_excludes_its_configuration(twin):
    df = _repeats(twin, {"single": [100, 101, 99], "ddp": [120, 121, 119]}, "tokens_per_s")
    df.loc[df["cell_id"] == f"{IDS['ddp']}-r1", ["outcome", "error"]] = ["oom", "CUDA out of memory"]
    rec = _one(df, Goal(name="fast", maximize="tokens_per_s"))
    assert rec["choice"] == f"{IDS['single']}-r0" and rec["candidates"] == 1 and rec["runner_up"] is None
    assert rec["excluded"] == {f"{IDS['ddp']}-r1": "oom: CUDA out of memory",
                               f"{IDS['ddp']}-r0": f"another repeat excluded: {IDS['ddp']}-r1",
                               f"{IDS['ddp']}-r2": f"another repeat excluded: {IDS['ddp']}-r1"}


def test_repeats_give_each_cell_its_seed_and_a_swept_seed_is_refused():
    from steps.plan.matrix import expand

    spec = parse_matrix({"name": "r", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": [1e-3],
                         "repeats": 3, "train": {"seed": 5}})
    cells = [p.cell for p in expand(spec)]
    assert [(c.repeat, c.train.seed) for c in cells] == [(0, 5), (1, 6), (2, 7)]
    assert len({c.cell_id for c in cells}) == 3
    one = [p.cell for p in expand(parse_matrix({**spec.model_dump(mode="json"), "repeats": 1}))]
    assert one[0].cell_id == cells[0].cell_id  # repeat 0 is the cell without repeats
    with pytest.raises(ConfigError) as err:
        parse_matrix({"name": "r", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3,
                      "repeats": 2, "sweep": {"train.seed": [1, 2]}})
    assert err.value.problems == ["sweep.train.seed: repeats: 2 sets the seeds (train.seed .. train.seed+1); "
                                  "sweep the seed or set repeats, not both"]
