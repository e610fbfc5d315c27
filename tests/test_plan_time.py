"""The plan's time and cost: this machine probed (`steps.estimate.probe`), calibrated on what ran
(`steps.estimate.store`, `steps.estimate.calibrate`), with intervals, scored held out on the
CPU twins and the H100 bench, and a table that fits a terminal."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from steps.estimate import calibrate, matrix_plan, probe, store
from steps.plan.matrix import expand, parse_matrix, parse_matrix_text

REPO = Path(__file__).resolve().parents[1]
TWINS = REPO / "tests" / "data" / "study_twins"
BENCH = REPO / "reports" / "benchmarks"
# Each twin's median tokens/s error, calibrated on the other four: 15%, 10%, 25%, 28%, 13% on the
# twins measured on 2026-12-06 (docs/evidence.md), where the runs of 2026-12-03 gave 13-21%.
HELD_OUT_TOKENS = 0.30
COVERAGE = 0.80  # share of measured values inside their planned interval, over the five twins
GPU_HELD_OUT = 0.15  # the H100 bench: calibrated on one micro-batch, the other's tokens/s

DEFAULT_SHAPES = """
name: probe-shapes
models: llama-debug
peft: lora
strategy: [single, ddp]
instance: local-cpu
gpus: 2
lr: {lrs}
micro_batch: 8
precision: fp32
seq_len: 64
train: {{max_steps: 150, lr_warmup_steps: 10, lora: {{r: 8, alpha: 16, dropout: 0.0,
        target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head]}}}}
data: {{task: synthetic, train_samples: 4096, val_samples: 256}}
"""


def twin_records() -> dict[str, list[calibrate.Record]]:
    """Each twin's measured cells with the probe entries this machine's probe gave their cells
    (`probe.json`, measured on the machine type that ran them)."""
    out = {}
    for folder in sorted(p for p in TWINS.iterdir() if p.is_dir()):
        probes = json.loads((folder / "probe.json").read_text())["cells"]
        out[folder.name] = calibrate.records(pd.read_parquet(folder / "results.parquet"), probes, run=folder.name)
    return out


@pytest.fixture(scope="module")
def held_out() -> dict[str, list[tuple[calibrate.Record, object]]]:
    """Each twin's cells planned with the calibration of the other four."""
    recs = twin_records()
    out = {}
    for name, mine in recs.items():
        fitted = calibrate.fit([r for other, rs in recs.items() if other != name for r in rs])
        out[name] = [(r, calibrate.predict(r.cell, fitted, probe=r.probe)) for r in mine]
    return out


def test_every_twin_cell_has_a_probe_entry():
    for name, recs in twin_records().items():
        missing = [r.cell.cell_id for r in recs if not r.probe or r.probe.get("error")]
        assert not missing, (name, missing)


@pytest.mark.parametrize("name", sorted(p.name for p in TWINS.iterdir() if p.is_dir()))
def test_held_out_each_twin_s_median_tokens_per_s_error_is_within_30_percent(held_out, name):
    errors = [abs(plan.tokens_per_s / float(r.row["tokens_per_s"]) - 1) for r, plan in held_out[name]]
    assert len(errors) >= 5
    assert statistics.median(errors) <= HELD_OUT_TOKENS, sorted(errors)
    # calibrated, not planned from first principles: the other twins cover these cells
    assert all(plan.calibration for _, plan in held_out[name])


def test_the_intervals_hold_at_least_80_percent_of_what_the_five_twins_measured(held_out):
    inside = {"tokens_per_s": [], "wall_s": []}
    for pairs in held_out.values():
        for r, plan in pairs:
            low, high = plan.tokens_per_s_range
            inside["tokens_per_s"].append(low <= float(r.row["tokens_per_s"]) <= high)
            low, high = plan.wall_s_range
            inside["wall_s"].append(low <= float(calibrate._as_run(r.row, "wall_s")) <= high)
    for what, hits in inside.items():
        assert sum(hits) / len(hits) >= COVERAGE, (what, sum(hits), len(hits))


def test_the_shipped_h100_entries_are_the_saved_bench_runs(tmp_path):
    from steps.trainer.bench import ship

    written = ship.ship(sorted(BENCH.glob(ship.BENCH_GLOB)), tmp_path)
    assert [p.name for p in written] == ["h100.jsonl"]
    assert written[0].read_text() == (store.SHIPPED / "h100.jsonl").read_text()
    entries = store.load([store.SHIPPED])
    assert {e["row"]["bench_label"] for e in entries} == {"trainer, fast paths mb=8", "trainer, no fast paths mb=8",
                                                         "trainer, fast paths"}


@pytest.mark.parametrize(("fitted_on", "planned"), [("h100", "h100-mb16"), ("h100-mb16", "h100")])
def test_held_out_on_the_h100_one_micro_batch_plans_the_other_within_15_percent(fitted_on, planned):
    recs = store.records(store.load([store.SHIPPED]))
    run = "2026-11-22-bench-gpu-lora-"
    calibration = calibrate.fit([r for r in recs if r.run == run + fitted_on])
    (target,) = [r for r in recs if r.run == run + planned and "no fast" not in r.row["bench_label"]]
    plan = calibrate.predict(target.cell, calibration)
    first = calibrate.predict(target.cell, None)
    measured = target.row["tokens_per_s"]
    assert abs(plan.tokens_per_s / measured - 1) <= GPU_HELD_OUT
    assert first.tokens_per_s == pytest.approx(65_086, rel=1e-3)  # the catalog's peak alone: +24% / +31%
    assert plan.calibration.startswith("H100: ")


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """The default matrix's two shapes, probed for real on this machine into a fresh cache."""
    cache = tmp_path_factory.mktemp("probe-cache")
    old = os.environ.get("FINETUNE_MATRIX_CACHE")
    os.environ["FINETUNE_MATRIX_CACHE"] = str(cache)
    spec = parse_matrix(parse_matrix_text(DEFAULT_SHAPES.format(lrs="[3.0e-3, 1.0e-2]")))
    cells = [p.cell for p in expand(spec)]
    messages: list[str] = []
    t0 = time.perf_counter()
    entries = probe.profile(cells, echo=messages.append)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = probe.profile(cells, echo=messages.append)
    yield {"cells": cells, "entries": entries, "again": again, "first_s": first_s,
           "again_s": time.perf_counter() - t0, "messages": messages, "cache": cache}
    if old is None:
        os.environ.pop("FINETUNE_MATRIX_CACHE", None)
    else:
        os.environ["FINETUNE_MATRIX_CACHE"] = old


@pytest.mark.slow  # the `probed` fixture times two shapes for real (about 30 s)
def test_the_probe_times_each_shape_once_and_then_reads_its_cache(probed):
    assert len(probed["messages"]) == 1 and "2 cell shapes, 1 start-ups" in probed["messages"][0]
    assert probed["again"] == probed["entries"]
    assert probed["again_s"] < 0.5
    for cell in probed["cells"]:
        entry = probed["entries"][cell.cell_id]
        assert not entry.get("error"), entry
        # a llama-debug layer's step on one core: milliseconds, not the nominal core's microseconds
        assert 1e-3 < entry["step_layer_s"] < 0.5  # a busy machine: slower
        # the rest (a 259-token head, the optimizer): within a layer's noise on this model, never negative
        assert 0 <= entry["step_base_s"] < 0.5
        # at the model's own depth (2 layers: the probe's deeper cut) the step is what was timed
        assert 2e-3 < entry["step_base_s"] + 2 * entry["step_layer_s"] < 1.0
        assert 1.0 < entry["import_s"] < 60.0
        # the synthetic task's rows: shorter than seq_len, as the trainer builds them
        assert 20 < entry["row_real_tokens"] < entry["row_width"] <= 64
        assert entry["copies"] == (2 if cell.world_size == 1 else 1)


@pytest.mark.slow  # the `probed` fixture times two shapes for real (about 30 s)
def test_a_probed_plan_says_where_its_time_comes_from(probed):
    cell = probed["cells"][0]
    entry = probed["entries"][cell.cell_id]
    plan = calibrate.predict(cell, None, probe=entry)
    assert plan.basis == "probe" and plan.calibration == ""
    step = entry["step_base_s"] + 2 * entry["step_layer_s"]  # llama-debug has 2 layers
    assert plan.step_s == pytest.approx(step)
    assert plan.tokens_per_s == pytest.approx(entry["row_real_tokens"] * 8 / step)
    low, high = plan.tokens_per_s_range  # no calibration covers it: the wide interval
    assert high / low == pytest.approx(pytest.approx(2.718281828 ** (2 * calibrate.UNCOVERED["probe"])))


@pytest.mark.slow  # the `probed` fixture times two shapes for real (about 30 s)
def test_a_100_cell_plan_prints_in_under_5_s_without_torch_and_fits_120_columns(probed, tmp_path):
    """In a fresh interpreter with the probe's cache of the shapes: nothing to time again."""
    lrs = ", ".join(f"{1e-4 * (k + 1):.1e}" for k in range(50))
    matrix = tmp_path / "hundred.yaml"
    matrix.write_text(DEFAULT_SHAPES.format(lrs=f"[{lrs}]"))
    script = (
        "import sys, time; t0 = time.perf_counter()\n"
        "from steps.estimate import cli\n"
        f"code = cli.main([{str(matrix)!r}, '--check', 'never', '--out', {str(tmp_path)!r}])\n"
        "assert 'torch' not in sys.modules, 'planning imported torch'\n"
        "print(f'PLAN_S {time.perf_counter() - t0:.2f}', file=sys.stderr); sys.exit(code)\n")
    env = {**os.environ, "FINETUNE_MATRIX_CACHE": str(probed["cache"]), "FINETUNE_MATRIX_PROBE": "1",
           "COLUMNS": "120", "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    seconds = float(re.search(r"PLAN_S ([\d.]+)", proc.stderr).group(1))
    assert seconds < 5.0, seconds
    assert "probing" not in proc.stderr  # the cache answered
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    assert "…" not in proc.stdout
    assert "100 cells: 100 run, 0 refused" in proc.stdout
    assert "time: 100 of 100 cells timed by the probe on this machine" in proc.stdout
    plan = pd.read_csv(tmp_path / "plan.csv")
    assert len(plan) == 100 and set(plan["basis"]) == {"probe"}
    assert {"weights", "activations", "tokens_per_s_low", "tokens_per_s_high", "calibration", "probe"} <= set(plan)
    rule = next(i for i, line in enumerate(lines) if line.strip() and set(line.strip()) <= {"─", " "})
    top = next(i for i, line in enumerate(lines) if "100 cells:" in line)
    header = " ".join(lines[top + 1:rule])  # a wrapped "cheapest" may stand on a line of its own above
    words = header.split()
    assert words.index("cell") < words.index("method") < words.index("strategy")
    for col in ("method", "strategy", "ranks", "mb×ga", "GB/rank", "verdict", "tokens/s", "interval", "wall", "$"):
        assert col in header


def test_the_wide_table_has_the_breakdown_by_part():
    spec = parse_matrix(parse_matrix_text(DEFAULT_SHAPES.format(lrs="[3.0e-3]")))
    planned, plan = matrix_plan.plan_spec(spec, check="never", calibration=False, probe=False)
    narrow, wide = _render(planned, plan, False), _render(planned, plan, True)
    assert "weights" not in narrow and "optim" not in narrow
    assert "weights" in wide and "optim" in wide and "load GB" in wide


def _render(planned, plan, wide: bool) -> str:
    import io

    out = io.StringIO()
    matrix_plan.show(planned, plan, out=out, wide=wide)
    return out.getvalue()


def test_a_run_s_measured_cells_go_into_the_store_and_calibrate_the_next_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_MATRIX_REPORTS", str(tmp_path))
    twin = TWINS / "study3-ddp-fsdp-naive-cpu"
    probes = json.loads((twin / "probe.json").read_text())["cells"]
    df = pd.read_parquet(twin / "results.parquet")
    assert store.add_run(df, probes) == 20
    assert store.add_run(df, probes) == 20  # the same run again replaces its cells
    entries = store.load([store.root()])
    assert len(entries) == 20 and {e["device"] for e in entries} == {"cpu"}
    fitted = store.calibration([store.root()])
    assert fitted["source"]["cpu"]["cells"] == 20 and fitted["source"]["cpu"]["runs"] == 1
    cell, row = calibrate.measured(df)[0]
    plan = calibrate.predict(cell, fitted, probe=probes[row["cell_id"]])
    assert plan.calibration.startswith("cpu: 20 cells of 1 runs, 2026-")
    # A GPU instance type whose cells found no GPU (the Batch emulation, a GPU type run on a CPU)
    # trained on the CPU: no timings for that GPU.
    on_gpu_type = df.assign(instance="g5.12xlarge")
    assert store.entries_of(on_gpu_type) == []
    assert len(store.entries_of(on_gpu_type.assign(device="NVIDIA A10G"))) == 20


def test_small_models_are_probed_at_their_own_depth_and_larger_ones_from_cuts():
    spec = parse_matrix(parse_matrix_text("""
name: depths
models: [llama-30m, tinyllama-1.1b]
peft: lora
strategy: single
instance: local-cpu
lr: 1.0e-3
micro_batch: 2
seq_len: 32
"""))
    cells = {p.cell.model: p.cell for p in expand(spec)}
    assert probe.depths(cells["llama-30m"]) == (1, 8)  # 8 layers, under WHOLE_PARAMS: timed whole
    assert probe.depths(cells["tinyllama-1.1b"]) == (1, 2)  # 1.1B: one layer and two
    entry = {"step_base_s": 0.01, "step_layer_s": 0.1, "ev_base_s": 0.0, "ev_layer_s": 0.0, "build_base_s": 0.0,
             "build_layer_s": 0.0, "data_s": 0.0, "row_real_tokens": 30.0, "import_s": 1.0}
    whole = calibrate.predict(cells["llama-30m"], None, probe={**entry, "layers": [1, 8]})
    cut = calibrate.predict(cells["tinyllama-1.1b"], None, probe={**entry, "layers": [1, 2]})
    old = calibrate.predict(cells["llama-30m"], None, probe=entry)  # before probe VERSION 3: cuts
    assert (whole.depth, cut.depth, old.depth) == ("exact", "extrapolated", "extrapolated")
    assert whole.step_s == pytest.approx(0.01 + 8 * 0.1) and cut.step_s == pytest.approx(0.01 + 22 * 0.1)
    # the calibration keeps the two apart at its specific levels, and shares the broad ones
    keys = calibrate._keys(cells["llama-30m"], "exact")
    assert keys[0].startswith("cpu|shape=") and keys[1].endswith("|exact") and not keys[2].endswith("|exact")
    assert keys[-3:] == ["cpu|local-cpu|single", "cpu|local-cpu", "cpu"]


def test_a_cell_measured_once_plans_its_shape_from_that_measurement():
    """A matrix run again (make run's second run), or another learning rate of a measured cell:
    its own measurement beats a line through cells like it (the second run came to 3.5-7.6% off
    against 7.4-13.8% through the line)."""
    twin = TWINS / "study3-ddp-fsdp-naive-cpu"
    probes = json.loads((twin / "probe.json").read_text())["cells"]
    recs = calibrate.records(pd.read_parquet(twin / "results.parquet"), probes, run="a")
    rec = recs[0]
    again = rec.cell.model_copy(update={"lr": rec.cell.lr * 3, "cell_id": "other-lr",
                                        "train": rec.cell.train.model_copy(update={"seed": 7})})
    longer = rec.cell.model_copy(update={"train": rec.cell.train.model_copy(update={"max_steps": 999})})
    bigger = rec.cell.model_copy(update={"micro_batch": rec.cell.micro_batch * 2})
    assert calibrate.shape(again) == calibrate.shape(rec.cell) == calibrate.shape(longer) != calibrate.shape(bigger)
    fitted = calibrate.fit(recs)
    plan = calibrate.predict(again, fitted, probe=rec.probe)
    same = [r for r in recs if calibrate.shape(r.cell) == calibrate.shape(rec.cell)]
    first = [calibrate.predict(r.cell, None, probe=r.probe).step_s for r in same]
    ratio = statistics.median(float(r.row["step_s"]) / f for r, f in zip(same, first))
    assert plan.step_s == pytest.approx(ratio * calibrate.predict(again, None, probe=rec.probe).step_s, rel=1e-9)
    assert plan.calibration.endswith(f"this shape measured {len(same)}x")
    if len(same) == 1:
        assert plan.step_s == pytest.approx(float(rec.row["step_s"]), rel=1e-9)
