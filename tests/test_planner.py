"""The planner (`python -m steps.plan`): parameter counts equal to PEFT's own, verdicts and the
cheapest fix, the matrix's `plan:` settings, the reference studies' outcomes at full scale, and
a 100-cell matrix planned in under 5 s without torch."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import textwrap
import time

import pytest

from steps.estimate import cli, matrix_plan, params, planner
from steps.plan import catalog
from steps.plan.matrix import expand, load_matrix, parse_matrix
from steps.plan.schema import ConfigError
from tests.conftest import REPO, make_cell, subprocess_env


@pytest.mark.parametrize("model", ["llama-debug", "llama-30m", "tinyllama-1.1b"])
@pytest.mark.parametrize("peft,targets", [("full", None), ("lora", None), ("lora", "all-linear"),
                                          ("dora", ["q_proj", "k_proj", "o_proj"]), ("qlora", r".*mlp\..*_proj")])
def test_counts_are_peft_s_own(model, peft, targets):
    """The model on the meta device with PEFT's adapter (steps.trainer.facts) against the count
    from the shape alone."""
    from steps.trainer import facts

    lora = {"r": 16, **({"target_modules": targets} if targets else {})}
    cell = make_cell(model=model, peft=peft, train={"init": "random", "tokenizer": "byte", "lora": lora})
    entry = facts.model_facts([cell])[model]
    adapter = next(iter(entry["adapters"].values()))
    counted = params.counts(catalog.model_presets()[model].config, peft, 16, targets)
    assert counted.trainable == adapter["trainable_params"]
    assert counted.total == entry["total_params"] + (0 if peft == "full" else adapter["trainable_params"])


def test_a_cell_that_will_not_fit_gets_the_cheapest_change_that_fits():
    """TinyLlama, full fine-tuning, bf16-mixed, micro-batch 16 x 2048 on one A100 40 GB: the
    model state is 17.6 GB (fp32 weights and gradients, two AdamW states), the activations
    101 GB. Accumulating over smaller micro-batches costs no time (checkpointing would recompute
    the forward): 4 x 4 still needs 45 GB, 2 x 8 fits in 32.7 GB."""
    cell = make_cell(model="tinyllama-1.1b", peft="full", instance="p4d.24xlarge", precision="bf16-mixed",
                     micro_batch=16, seq_len=2048, train={"max_steps": 100})
    plan = planner.predict(cell)
    assert plan.verdict == "will not fit" and plan.device_gb == 40.0
    m = plan.memory_gb
    assert (round(m["weights"], 2), round(m["grads"], 2), round(m["optim"], 2)) == (4.4, 4.4, 8.8)
    assert round(m["activations"], 1) == 101.1
    assert plan.fix == "micro_batch 2 x grad_accum 8"
    smaller = [planner.predict(cell.model_copy(update={"micro_batch": mb, "grad_accum": 16 // mb})) for mb in (4, 2)]
    assert [(p.verdict, round(p.total_gb, 1)) for p in smaller] == [("will not fit", 45.0), ("fits", 32.7)]
    assert plan.reason().startswith("predicted out of memory: 119.3 GB per rank > 40.0 GB (weights 4.4, ")
    assert plan.reason().endswith("; fits with micro_batch 2 x grad_accum 8")
    # Time: FLOPs per token over the A100's bf16 peak at the single-GPU efficiency.
    shape_fpt = 6 * (1_100_048_384 - 65_536_000) + 12 * 22 * 32 * 64 * 2048
    assert plan.step_s == pytest.approx(shape_fpt * 16 * 2048 / (312e12 * 0.35), rel=1e-9)
    assert plan.wall_s == pytest.approx(100 * plan.step_s + 60)
    assert plan.cost_usd == pytest.approx(plan.wall_s / 3600 * catalog.instances()["p4d.24xlarge"].price_per_hour_usd)


def test_a_lora_cell_fits_and_a_cap_makes_it_tight_then_not():
    cell = make_cell(model="tinyllama-1.1b", peft="lora", instance="p4d.24xlarge", precision="bf16-mixed",
                     micro_batch=4, seq_len=512)
    plan = planner.predict(cell)
    assert plan.verdict == "fits" and plan.fix is None
    total = plan.total_gb
    capped = [planner.predict(cell.model_copy(update={"train": cell.train.model_copy(update={"memory_cap_gb": cap})}))
              for cap in (total / 0.95, total * 0.9)]
    assert [c.verdict for c in capped] == ["tight", "will not fit"]


MATRIX = textwrap.dedent("""
    name: planned
    models: [tinyllama-1.1b, llama-2-7b]
    peft: [full, lora]
    strategy: single
    instance: p4d.24xlarge
    lr: 1.0e-4
    micro_batch: 8
    precision: bf16-mixed
    seq_len: 1024
    train: {max_steps: 500}
""")


def _spec(extra: str = ""):
    import yaml

    return parse_matrix(yaml.safe_load(MATRIX + extra))


def test_predicted_out_of_memory_cells_become_skipped_rows_when_asked():
    planned, mplan = matrix_plan.plan_spec(_spec("plan: {try_predicted_oom: true}\n"), check="never")
    assert not any(p.refused for p in planned)
    # A100 40 GB, micro-batch 8 x 1024: full fine-tuning of both, and LoRA on the 7B
    assert [cid.rsplit("-", 1)[0] for cid in mplan.predicted_oom] == [
        "tinyllama-1.1b-full-single-1x1", "llama-2-7b-full-single-1x1", "llama-2-7b-lora-single-1x1"]
    # By default only the cell predicted far beyond its memory (full 7B: 187 GB, 4.7x) is refused;
    # the close calls (1.1x, 1.5x) are launched, and end `oom` if the plan was right.
    planned, _ = matrix_plan.plan_spec(_spec(), check="never")
    (far,) = [p for p in planned if p.refused]
    assert far.cell.cell_id == mplan.predicted_oom[1]
    assert far.refused.startswith("predicted out of memory: 186.9 GB per rank > 40.0 GB (weights 27.0, ")
    assert far.refused.endswith("; 4.7x what a rank may use, refused before launch: use an instance with more memory "
                                "per device than p4d.24xlarge or make the cell smaller, or set "
                                "plan.try_predicted_oom: true to launch it anyway")
    planned, _ = matrix_plan.plan_spec(_spec("plan: {skip_predicted_oom: true}\n"), check="never")
    skipped = {p.cell.cell_id: p.refused for p in planned if p.refused}
    assert list(skipped) == mplan.predicted_oom
    assert all(reason.startswith("predicted out of memory: ") for reason in skipped.values())


def test_the_table_counts_refused_cells_apart_and_says_why_and_what_fits(capsys):
    """A cell the `plan:` settings refuse after it was predicted (far beyond its memory, or over
    its time limit) is counted as refused, not as one that runs, and stays out of the totals; the
    table lists each refusal's reason and each close call's cheapest fix under it."""
    import io

    planned, mplan = matrix_plan.plan_spec(_spec(), check="never", calibration=False, probe=False)
    out = io.StringIO()
    matrix_plan.show(planned, mplan, out=out)
    text = out.getvalue()
    far = next(p for p in planned if p.refused)
    assert "4 cells: 3 run, 1 refused; 2 predicted out of memory" in text
    assert f"- {matrix_plan.short_id(far.cell)}: predicted out of memory: 186.9 GB per rank > 40.0 GB" in text
    closes = [p for p in planned if not p.refused and mplan.plans[p.cell.cell_id].verdict == "will not fit"]
    assert [c.cell.cell_id.rsplit("-", 1)[0] for c in closes] == [
        "tinyllama-1.1b-full-single-1x1", "llama-2-7b-lora-single-1x1"]
    fixes = text.split("Cheapest fix:\n")[1].splitlines()[:2]
    for line, close in zip(fixes, closes, strict=True):
        plan = mplan.plans[close.cell.cell_id]
        assert line.startswith(f"- {matrix_plan.short_id(close.cell)} (will not fit, ") and line.endswith(plan.fix)
    fitting = [mplan.plans[p.cell.cell_id] for p in planned if p not in closes and not p.refused]
    assert mplan.cost_usd == pytest.approx(sum(p.cost_usd for p in fitting))

    # Over the time limit: every cell is refused (the far one for its memory), nothing to pay for.
    import yaml

    data = yaml.safe_load(MATRIX)
    data["train"]["timeout_s"] = 60
    planned, mplan = matrix_plan.plan_spec(parse_matrix(data), check="never", calibration=False, probe=False)
    assert sum("over train.timeout_s=60: it would end `timeout`" in (p.refused or "") for p in planned) == 3
    assert (mplan.runs, mplan.predicted_oom, mplan.cost_usd, mplan.wall_s) == (0, [], None, None)


def test_a_matrix_over_its_budget_is_refused_before_it_runs():
    _, mplan = matrix_plan.plan_spec(_spec(), check="never")
    fitting = [p for p in mplan.plans.values() if p.verdict != "will not fit"]
    cost = sum(p.cost_usd for p in mplan.plans.values())
    assert mplan.cost_usd == pytest.approx(sum(p.cost_usd for p in fitting))
    with pytest.raises(ConfigError) as err:
        matrix_plan.plan_spec(_spec("plan: {max_cost_usd: 1.0, max_hours: 0.01, try_predicted_oom: true}\n"),
                              check="never")
    assert err.value.problems == [
        f"plan.max_cost_usd: the cells that would run are predicted to cost ${cost:,.2f}, over the budget of $1.00 "
        "(`python -m steps.plan` shows each cell)",
        f"plan.max_hours: the cells that would run are predicted to take "
        f"{sum(p.wall_s for p in mplan.plans.values()) / 3600:,.2f} h, over the budget of 0.01 h "
        "(`python -m steps.plan` shows each cell)"]
    # Skipped cells do not count against the budget.
    matrix_plan.plan_spec(_spec(f"plan: {{skip_predicted_oom: true, max_cost_usd: {sum(p.cost_usd for p in fitting) + 0.01}}}\n"),
                          check="never")


def _plans(path: str, **train) -> dict[tuple, planner.CellPlan]:
    """The plan of each cell of a matrix in configs/matrix (`train`: settings over the file's)."""
    if train:
        import yaml

        data = yaml.safe_load((REPO / "configs" / "matrix" / path).read_text())
        spec = parse_matrix({**data, "train": {**data.get("train", {}), **train}}, path)
    else:
        spec = load_matrix(REPO / "configs" / "matrix" / path)
    planned = expand(spec)
    mplan = matrix_plan.plan_matrix(planned, None, spec.compute)
    return {(c.model, c.peft, c.strategy, c.gpus, c.micro_batch, c.precision, c.train.optimizer):
            mplan.plans[c.cell_id] for c in (p.cell for p in planned if not p.refused)}


def _verdicts(path: str) -> dict[tuple, str]:
    return {key: plan.verdict for key, plan in _plans(path).items()}


# Reference study 4 (the LitGPT lab's recipes: Alpaca-2k, up to 512 tokens, AdamW unless stated)
# on one A100 80 GB: what it reported for each cell of study4-litgpt-memory.yaml, keyed like
# `_plans`: peak allocated GB, or None where it ran out of memory. The 13B SGD cell ran (no
# number given); LitGPT's own model keeps less for backward than transformers + PEFT (its LoRA
# computes the head and the loss in chunks), so LoRA cells are planned 19-40% above LitGPT's.
STUDY4_REPORTED = {
    ("tinyllama-1.1b", "full", "single", 1, 32, "fp32", "adamw"): None,
    ("tinyllama-1.1b", "full", "single", 1, 8, "fp32", "adamw"): 30.4,
    ("tinyllama-1.1b", "full", "single", 1, 8, "bf16-true", "adamw"): 20.1,
    ("tinyllama-1.1b", "full", "single", 1, 8, "bf16-mixed", "adamw"): 31.3,
    ("open-llama-3b", "full", "single", 1, 8, "bf16-true", "adamw"): 46.9,
    ("open-llama-7b", "full", "single", 1, 4, "bf16-true", "adamw"): 69.7,
    ("open-llama-13b", "full", "single", 1, 1, "bf16-true", "adamw"): None,
    ("open-llama-7b", "full", "ddp", 4, 4, "bf16-true", "adamw"): 74.0,  # 68-74 per GPU
}


def test_study4_at_full_scale_the_plan_reproduces_what_fit_one_a100_80gb():
    """TinyLlama full fine-tuning at micro-batch 32 and the 13B with AdamW do not fit; the 13B
    with SGD, every LoRA and QLoRA cell and 7B DDP do; full fine-tuning's memory is planned
    within 20% of what the study measured."""
    plans = _plans("study4-litgpt-memory.yaml")
    verdicts = {k: p.verdict for k, p in plans.items()}
    assert verdicts[("tinyllama-1.1b", "full", "single", 1, 32, "fp32", "adamw")] == "will not fit"
    assert verdicts[("open-llama-13b", "full", "single", 1, 1, "bf16-true", "adamw")] == "will not fit"
    assert verdicts[("open-llama-13b", "full", "single", 1, 1, "bf16-true", "sgd")] == "fits"
    assert sorted(k for k, v in verdicts.items() if v == "will not fit") == sorted(
        k for k, v in STUDY4_REPORTED.items() if v is None)
    assert all(v == "fits" for k, v in verdicts.items() if k[1] in ("lora", "qlora"))
    for key, reported in STUDY4_REPORTED.items():
        if reported is not None:  # CUDA's peak allocated holds no context
            planned = plans[key].peak_gb - plans[key].memory_gb["runtime"]
            assert planned == pytest.approx(reported, rel=0.2), key


# Its LoRA r32 cells (all linear layers and the head, micro-batch 4 x 4, dropout 0.05) and its
# QLoRA 7B cell, peak allocated GB.
STUDY4_ADAPTERS = {
    ("tinyllama-1.1b", "lora"): 8.0, ("open-llama-3b", "lora"): 17.0, ("open-llama-7b", "lora"): 30.0,
    ("open-llama-13b", "lora"): 51.5, ("open-llama-7b", "qlora"): 21.3,
}
# With the defaults the adapted projections run through `train.lora_kernels` (one byte of mask
# per element, the input shared with the frozen matmul): at or below the study's numbers (QLoRA
# 0.80 of it, LoRA 0.89-0.91; QLoRA / LoRA at 7B 0.64). With PEFT's modules (`lora_kernels:
# false`) each adapted projection keeps its dropped-out input and mask, seven per layer where
# LitGPT's fused qkv keeps five: the plan is above the study by up to this.
ADAPTERS_ABOVE = 0.26


def test_study4_s_adapter_cells_are_planned_against_what_the_study_measured():
    """Every LoRA and QLoRA cell of the study against its measured GB: with defaults at or below
    it (no lower than 0.75 of it), with PEFT's modules within ADAPTERS_ABOVE above it; QLoRA
    keeps under 0.75 of LoRA's memory at 7B either way (the study: 0.71)."""
    for train, low, high in (({}, 0.75, 1.0), ({"lora_kernels": False}, 1.0, 1 + ADAPTERS_ABOVE)):
        plans = {(k[0], k[1]): p for k, p in _plans("study4-litgpt-memory.yaml", **train).items()
                 if k[1] in ("lora", "qlora")}
        planned = {k: plans[k].peak_gb - plans[k].memory_gb["runtime"] for k in STUDY4_ADAPTERS}
        for key, measured in STUDY4_ADAPTERS.items():
            assert low <= planned[key] / measured <= high, (train, key, round(planned[key], 1), measured)
        ratio = planned[("open-llama-7b", "qlora")] / planned[("open-llama-7b", "lora")]
        assert ratio <= 0.75, (train, ratio)


def test_the_verdict_is_whole_at_200_and_at_120_columns(capsys, monkeypatch):
    """Study 4 over 20,000 steps (costs in the hundreds) makes a table of 126 columns: a
    200-column terminal shows it whole, and at 120 rich takes a column off the others but never
    off the verdict ("will not fi" when it took one off every column)."""
    import io

    spec = load_matrix(REPO / "configs" / "matrix" / "study4-litgpt-memory.yaml")
    spec = spec.model_copy(update={"train": spec.train.model_copy(update={"max_steps": 20_000, "timeout_s": 1e7})})
    planned, mplan = matrix_plan.plan_spec(spec, check="never", calibration=False, probe=False)
    monkeypatch.setenv("COLUMNS", "200")
    matrix_plan.show(planned, mplan)  # to stdout: the terminal's 200 columns
    at_200 = capsys.readouterr().out
    out = io.StringIO()
    matrix_plan.show(planned, mplan, out=out, width=120)
    at_120 = out.getvalue()
    closes = [p.cell for p in planned if mplan.plans[p.cell.cell_id].verdict == "will not fit"]
    assert len(closes) == 2
    for text, width in ((at_200, 126), (at_120, 120)):
        table = text.split("Cheapest fix:")[0].splitlines()
        assert max(len(line) for line in table) == width
        rows = [line for line in table if "/80.0" in line]
        assert sum(" will not fit " in line for line in rows) == sum("will not" in line for line in rows) == 2
    def unfit(text: str) -> list[list[str]]:
        return [line.split() for line in text.split("Cheapest fix:")[0].splitlines() if "will not fit" in line]

    assert [row[:2] for row in unfit(at_200)] == [matrix_plan.short_id(c).split() for c in closes]
    assert [row[0] for row in unfit(at_120)] == [c.model for c in closes]


def test_study2_at_full_scale_full_fine_tuning_does_not_fit_zero3_on_2_and_4_a100_40gb():
    verdicts = _verdicts("study2-p4d-tensor-zero3.yaml")
    assert [verdicts[("llama-2-7b", "full", "zero3", g, 8, "bf16-mixed", "adamw")] for g in (2, 4)] == \
        ["will not fit"] * 2
    assert all(v in ("fits", "tight") for k, v in verdicts.items() if k[1] in ("lora", "qlora"))


HUNDRED = textwrap.dedent("""
    name: hundred
    models: [tinyllama-1.1b, open-llama-3b, llama-2-7b, open-llama-7b, llama-2-13b]
    peft: [full, lora]
    strategy: [single, ddp, fsdp, zero2, zero3]
    instance: [p4d.24xlarge, g5.12xlarge]
    gpus: 4
    lr: 1.0e-4
    precision: bf16-mixed
    seq_len: 1024
""")


def test_a_100_cell_plan_prints_in_under_5_s_without_torch(tmp_path):
    """The whole command, interpreter start included, in its own process. Its CPU time (user +
    system) is what is bounded: a busy test machine stretches wall time, not work (about 1 s
    here, idle)."""
    path = tmp_path / "hundred.yaml"
    path.write_text(HUNDRED)
    code = ("import runpy, sys; sys.argv = ['plan', sys.argv[1]]\n"
            "try:\n    runpy.run_module('steps.plan', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('torch imported:', 'torch' in sys.modules)")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=60)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # full fine-tuning of the 7B and 13B on 24 GB A10Gs is refused: over twice what a rank may use
    assert "100 cells: 69 run, 31 refused" in proc.stdout
    assert "Refused before launch:" in proc.stdout and "plan.try_predicted_oom: true to launch it" in proc.stdout
    assert proc.stdout.rstrip().endswith("torch imported: False")
    assert cpu < 5.0, (cpu, wall)


@pytest.mark.slow
def test_the_flow_s_start_skips_predicted_oom_cells_and_prints_the_plan(capsys):
    """`start` (steps.flow.tasks.plan) with the models' facts read, as the flow runs it: the cell
    whose memory cap is below its estimate becomes a `skipped` row with the estimate as reason."""
    from steps.flow import tasks

    matrix = {"name": "capped", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3,
              "micro_batch": [4, 512], "seq_len": 256, "train": {"max_steps": 3, "memory_cap_gb": 1.2},
              "plan": {"skip_predicted_oom": True}}
    cells, skipped, saving = tasks.plan(matrix)
    assert saving is None  # no economy: section
    assert [(c["cell"]["micro_batch"], c["refused"]) for c in cells] == [(4, None)]  # the foreach: cells that run
    ((cell, metrics),) = skipped  # a refused cell starts no task: its row as the table will have it
    assert cell["micro_batch"] == 512 and metrics["outcome"] == "skipped"
    assert metrics["error"].startswith("predicted out of memory: ") and "> 1.2 GB" in metrics["error"]
    out = capsys.readouterr().out
    assert "2 cells: 1 run, 1 refused; 0 predicted out of memory" in out and "Cells predicted to fit: 1" in out
    assert f"- llama-debug {cell['cell_id'].rsplit('-', 1)[1][:6]}: predicted out of memory: " in out


TWINS = REPO / "tests" / "data" / "study_twins"


def test_a_results_row_turns_back_into_the_cell_that_ran():
    from steps.estimate import calibrate
    from steps.results import table

    cell = make_cell(peft="dora", strategy="fsdp", gpus=2, precision="bf16-mixed",
                     train={"lora": {"r": 4, "target_modules": ["q_proj", "o_proj"]}, "loss": "chunked"},
                     data={"packing": True})
    row = table.row("r1", cell.model_dump(mode="json"), {"cell_id": cell.cell_id, "outcome": "ok"})
    assert calibrate.cell_of_row(row) == cell


def test_the_fit_is_robust_to_a_cell_slowed_by_a_busy_machine():
    from steps.estimate import calibrate

    # step = 0.5 s + 2 x ideal, and one cell three times slower
    points = [(x, 0.5 + 2 * x) for x in (1.0, 2.0, 3.0, 4.0)] + [(2.5, 3 * (0.5 + 2 * 2.5))]
    assert calibrate._line(points) == pytest.approx((0.5, 2.0))
    assert calibrate._line([(2.0, 3.0)]) == (0.0, 1.5)  # one point: through the origin


@pytest.mark.parametrize("name", sorted(p.name for p in TWINS.iterdir()))
def test_calibrated_on_a_twin_s_runs_the_median_cell_s_tokens_per_s_is_within_20_percent(name):
    """Each CPU twin's own results table with the probe entries of its cells: fit, then plan
    the same cells again. The twins ran with cells side by side on 2 cores, and repeats of one
    configuration differ by up to 4x (study 1), which no fit removes: the median cell is the
    measure. (Held out, each twin from the other four: tests/test_plan_time.py.)"""
    from steps.estimate import calibrate

    rows = calibrate.read_runs([TWINS / name])
    probes = json.loads((TWINS / name / "probe.json").read_text())["cells"]
    scored = calibrate.planned_vs_measured(rows, calibrate.fit(calibrate.records(rows, probes)), probes)
    errors = scored["tokens_per_s_error"].dropna().abs()
    assert len(errors) >= 5
    assert errors.median() <= 0.20, errors.describe()


def test_calibrate_prints_the_fit_saves_it_and_plans_with_it(tmp_path, capsys):
    twin = TWINS / "study3-ddp-fsdp-naive-cpu"
    matrix = REPO / "configs" / "matrix" / "study3-ddp-fsdp-naive-cpu.yaml"
    saved = tmp_path / "fit.json"
    assert cli.main([str(matrix), "--check", "never", "--calibrate", str(twin),
                     "--save-calibration", str(saved)]) == 0
    first = capsys.readouterr().out
    assert "tokens/s: median |error| 3.9% over 20 cells" in first  # in sample: each shape's own cells
    assert "and 20 cell shapes measured (20 cells)" in first
    assert cli.main([str(matrix), "--check", "never", "--calibration", str(saved)]) == 0
    again = capsys.readouterr().out
    assert first.splitlines()[-1] == again.splitlines()[-1]  # the same totals from the saved fit
    assert cli.main([str(matrix), "--check", "never"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] != again.splitlines()[-1]  # defaults differ


def test_a_cell_whose_shards_fit_can_still_run_out_of_memory_while_loading():
    """Llama-2-13B, full fine-tuning, bf16-mixed, ZeRO-3 over 8 A100 40 GB: each rank's shard of
    the training state (16 B per parameter / 8) and a checkpointed micro-batch fit, but the
    trainer puts the whole model (fp32 master weights, 52 GB) on every GPU before DeepSpeed
    partitions it."""
    cell = make_cell(model="llama-2-13b", peft="full", strategy="zero3", gpus=8, instance="p4d.24xlarge",
                     precision="bf16-mixed", micro_batch=1, seq_len=256, train={"gradient_checkpointing": True})
    plan = planner.predict(cell)
    assert plan.total_gb < 40.0 < plan.load_gb
    assert round(plan.load_gb - plan.memory_gb["runtime"], 1) == 52.1  # 13,015,864,320 parameters x 4 B
    assert plan.verdict == "will not fit"
    assert plan.reason().startswith("predicted out of memory while loading: 52.7 GB per rank > 40.0 GB (the whole "
                                    "model on every rank before it is sharded; training would need ")
    # Tensor parallelism loads each rank's shard only.
    tensor = planner.predict(cell.model_copy(update={"strategy": "tensor", "peft": "lora"}))
    assert tensor.load_gb == pytest.approx(0.6 + 13_015_864_320 * 2 / 8 / 1e9, rel=1e-3)
