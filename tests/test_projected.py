"""The decision at full scale, predicted by the plan (`report.project_to`): the key is refused
where it names no matrix, a small full-scale matrix with known planner answers is decided as the
planner ranks it, goals on the loss say they cannot be predicted, `decision.json` carries the
projection, and none of it imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steps import REPO_ROOT
from steps.estimate import calibrate, cost, store
from steps.plan.matrix import expand, load_matrix, parse_matrix
from steps.plan.schema import ConfigError
from steps.report import build as report
from steps.report import projected
from tests.conftest import REPO

TWINS = REPO / "tests" / "data" / "study_twins"
# TinyLlama on g5.12xlarge (4x A10G 24 GB): LoRA under single and DDP at two learning rates, and
# full fine-tuning on one GPU (26.5 GB per rank in bf16-mixed: predicted not to fit).
SMALL = {
    "name": "small-full", "models": "tinyllama-1.1b", "peft": "lora", "strategy": ["single", "ddp"],
    "instance": "g5.12xlarge", "gpus": 4, "lr": [1.0e-4, 2.0e-4], "micro_batch": 4, "precision": "bf16-mixed",
    "seq_len": 512, "include": [{"peft": "full", "strategy": "single", "lr": 1.0e-4}], "compute": "kubernetes",
    "remote": {"image": "registry.example.com/finetune-matrix:0.1.0"}, "train": {"max_steps": 100},
}
GOALS = [{"name": "quality", "minimize": "val_loss"},
         {"name": "per-dollar", "maximize": "tokens_per_usd"},
         {"name": "small", "minimize": "peak_mem_gb", "max_val_loss": 2.0}]
TWIN_SPEC = {"name": "twin", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1.0e-3}


@pytest.fixture
def small(tmp_path) -> Path:
    path = tmp_path / "small-full.yaml"
    path.write_text(yaml.safe_dump(SMALL))
    return path


def _plans(path: Path) -> dict[str, object]:
    """Each cell's plan as the planner gives it, one cell at a time (the answers the projection
    must reproduce)."""
    fitted = store.calibration()
    return {p.cell.cell_id: (p.cell, calibrate.predict(p.cell, fitted, "kubernetes", {}, fixes=True))
            for p in expand(load_matrix(path))}


def test_a_missing_matrix_is_refused_with_the_key_the_value_and_what_is_allowed():
    with pytest.raises(ConfigError) as err:
        parse_matrix({**TWIN_SPEC, "report": {"project_to": "configs/matrix/nope.yaml"}})
    (problem,) = err.value.problems
    assert problem.startswith(f"report.project_to: 'configs/matrix/nope.yaml' is not a file (a path from the "
                              f"repository root {REPO_ROOT}, or absolute); allowed values: a matrix file, such as ")
    assert "configs/matrix/study1-sagemaker-g5.yaml" in problem.split("such as ")[1]


def test_a_file_that_is_no_matrix_is_refused_with_its_problems(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodels: tinyllama-1.1b\n")
    with pytest.raises(ConfigError) as err:
        parse_matrix({**TWIN_SPEC, "report": {"project_to": str(bad)}})
    assert err.value.problems == [
        f"report.project_to: '{bad}' is not a valid matrix (peft: required key is missing; strategy: required key is "
        f"missing; lr: required key is missing); allowed values: a matrix file that `python -m steps.matrix` accepts"]


def test_a_matrix_file_is_accepted_relative_to_the_repository_root(small):
    spec = parse_matrix({**TWIN_SPEC, "report": {"project_to": "configs/matrix/study5-parallelism-1b.yaml"}})
    assert spec.report.project_to == "configs/matrix/study5-parallelism-1b.yaml"
    assert parse_matrix({**TWIN_SPEC, "report": {"project_to": str(small)}}).report.project_to == str(small)
    assert parse_matrix(TWIN_SPEC).report.project_to is None


def test_the_projection_decides_on_the_planners_answers(small):
    plans = _plans(small)
    full = next(cid for cid in plans if "-full-" in cid)
    assert plans[full][1].verdict == "will not fit" and plans[full][1].peak_gb == pytest.approx(26.5, abs=0.05)
    projection = projected.project({"matrix_spec": {**TWIN_SPEC, "goals": GOALS,
                                                    "report": {"project_to": str(small)}}})
    assert projection.cells == 5 and len(projection.configs) == 3  # the learning rates plan alike
    quality, per_dollar, memory = projection.records

    assert quality["cannot_predict"].startswith("the plan predicts memory, speed, time and cost, not the loss")
    assert quality["choice"] is None and quality["predicted"] is True

    # tokens per dollar: the plan's tokens/s over g5.12xlarge's $5.672 an hour, best first
    def per_usd(cid):
        cell, plan = plans[cid]
        return plan.tokens_per_s * 3600 / cost.hourly_usd(cell, "kubernetes")
    fitting = [cid for cid, (_, plan) in plans.items() if plan.verdict != "will not fit"]
    best = max(fitting, key=per_usd)
    assert "-lora-ddp-" in best
    assert per_dollar["choice"] in fitting and per_usd(per_dollar["choice"]) == pytest.approx(per_usd(best))
    assert per_dollar["value"] == pytest.approx(per_usd(best))
    lo, hi = plans[best][1].tokens_per_s_range
    assert per_dollar["interval"] == pytest.approx([x * 3600 / 5.672 for x in (lo, hi)])
    assert len(per_dollar["choice_cells"]) == 2  # both learning rates
    assert per_dollar["excluded"] == {full: plans[full][1].reason()}
    assert per_dollar["excluded"][full].startswith("predicted out of memory: 26.5 GB per rank > 24.0 GB")
    assert per_dollar["candidates"] == 2 and "-lora-single-" in per_dollar["runner_up"]
    # single's interval (x/÷ 2 from the catalog's peak) reaches into DDP's: tied, and the margin spans 0
    assert per_dollar["tied_with"] == [per_dollar["runner_up"]] and per_dollar["margin_interval"][0] < 0

    # memory: single and DDP hold the same per rank; the quality constraint cannot be checked
    assert memory["unchecked"] == ["max_val_loss"] and "-lora-single-" in memory["choice"]
    assert memory["noise"].startswith("the plan's memory ±10%")

    text = projected.section(projection)
    assert text.startswith("## At full scale (predicted)\n\n_Predicted by the plan, not measured._")
    assert "- **quality** (minimize validation loss): cannot be predicted: the plan predicts memory" in text
    assert "- **per-dollar** (maximize tokens per dollar): predicted lora ddp x4 (its 2 learning rates alike), " \
           "tokens per dollar " in text
    assert "Tied within the plan's intervals with lora single x1 (its 2 learning rates alike): the plan cannot tell " \
           "them apart. Excluded: 1 predicted out of memory." in text
    assert "Not checked: max_val_loss (the plan predicts no loss or accuracy)." in text
    assert ("Predicted not to fit (1 of 3 configurations, 1 cell):\n\n- full single x1: 26.5 GB per rank > 24.0 GB"
            in text)


def test_a_run_without_project_to_has_no_projection():
    assert projected.project({"matrix_spec": TWIN_SPEC}) is None
    assert projected.project({}) is None


def test_a_matrix_gone_since_the_run_is_said_not_crashed():
    projection = projected.project({"matrix_spec": {**TWIN_SPEC, "report": {"project_to": "configs/gone.yaml"}}})
    assert projection.error and projection.to_json() == {"matrix": "configs/gone.yaml", "predicted": True,
                                                         "error": projection.error, "goals": []}
    assert projected.section(projection).startswith("## At full scale (predicted)\n\n`report.project_to` names "
                                                    "`configs/gone.yaml`, which cannot be planned here:")


def test_the_report_and_decision_json_carry_the_projection(tmp_path):
    """The study-5 twin projects to its full-scale matrix: the section follows the decision, and
    decision.json holds it apart from this run's own goals."""
    assert report.main([str(TWINS / "study5-parallelism-1b-cpu"), "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "decision.json").read_text())
    got = saved["projected"]
    assert got["matrix"] == "configs/matrix/study5-parallelism-1b.yaml" and got["predicted"] is True
    assert [g["name"] for g in got["goals"]] == [g["name"] for g in saved["goals"]]
    assert all(g["predicted"] for g in got["goals"])
    (per_dollar,) = [g for g in got["goals"] if g["objective"] == "tokens_per_usd"]
    assert "-lora-hybrid-1x4-" in per_dollar["choice"]
    # every configuration fits: one GPU at micro-batch 32 too, its LoRA through the kernels (the
    # default; 41.9 GB on PEFT's modules), so all five are candidates (the not-fit path: above)
    assert got["not_fit"] == per_dollar["excluded"] == {} and per_dollar["candidates"] == 5
    md = (tmp_path / "report.md").read_text()
    # after the decision (and what this run cannot tell), before the findings
    assert md.index("## Decision\n") < md.index("## At full scale (predicted)\n") < md.index("## Key findings")


def test_projecting_imports_no_torch():
    code = ("import sys; from steps.report import projected; "
            "p = projected.project({'matrix_spec': {'report': {'project_to': 'configs/matrix/study4-litgpt-memory.yaml'}}}); "
            "projected.section(p); json = p.to_json(); "
            "assert json['goals'] and not p.error, json; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
