"""`make gpu-evidence` on a machine without a GPU: the dry run (`DRY=1`) checks every command
line, file and import the parts would use; the runner's time limits stop a part with everything
it started; pytest's own JUnit XML becomes tests.json; the summary scores the parts' files
against the issue's targets; a wheelhouse that lacks a wheel is named before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from steps.report.evidence import environment, parts, run, summary
from tests.conftest import REPO


def test_the_parts_fit_nine_minutes_in_the_issue_s_order():
    assert [p.name for p in parts.PARTS] == ["tests", "lora-1.1b", "qlora-vs-lora-7b", "flow"]
    assert parts.BUDGET_S == sum(p.limit_s for p in parts.PARTS) <= 9 * 60
    assert [p.output for p in parts.PARTS] == ["tests.json", "lora-1.1b.json", "qlora-vs-lora-7b.json", "flow.json"]


@pytest.mark.slow  # four checking processes (torch, transformers, pytest's collection): ~25 s
def test_the_dry_run_checks_every_part_and_runs_nothing(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-evidence", "DRY=1",
                           f"EVIDENCE_ARGS=--out {tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = next(tmp_path.glob("*-dry-run"))
    assert sorted(p.name for p in out.glob("*.check.log")) == [
        "flow.check.log", "lora-1.1b.check.log", "qlora-vs-lora-7b.check.log", "tests.check.log"]
    assert sorted(p.name for p in out.glob("*.json")) == ["summary.json"]  # no part's results: nothing ran
    # what it checked: the bench's eight cells valid and not refused, the GPU tests collected
    # with the evidence's cells, the flow's matrix expanded to its four cells
    bench = json.loads((out / "lora-1.1b.check.log").read_text().strip().splitlines()[-1])
    assert bench["cells"] == 8 and bench["problems"] == []
    assert "tests collected" in (out / "tests.check.log").read_text()
    assert json.loads((out / "flow.check.log").read_text().strip().splitlines()[-1]) == {"problems": []}
    assert "wheels for a bare GPU machine (make gpu-wheels): metaflow==2.19.39 " in proc.stdout
    assert "liger-kernel==0.8.5" in proc.stdout
    assert "# GPU evidence (dry run: nothing ran)" in (out / "summary.md").read_text()


@pytest.mark.slow  # pytest's collection of tests/test_gpu.py in a subprocess (~8 s)
def test_a_gpu_test_cell_that_does_not_exist_fails_the_dry_run():
    env = {**os.environ, "FINETUNE_MATRIX_GPU_CELLS": "lora-bf16-mixed,lora-kernelz"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FINETUNE_MATRIX_GPU_CELLS names no cell of tests/test_gpu.py: ['lora-kernelz']" in proc.stdout


def test_a_part_past_its_limit_is_stopped_with_every_process_it_started(tmp_path):
    pid_file = tmp_path / "child.pid"
    part = parts.Part("sleepy", 60, ("-c", textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(120)
        """)), "sleepy.json", ())
    t0 = time.monotonic()
    status = run.run_part(part, sys.executable, tmp_path, limit_s=1.2, dry=False, echo=lambda *_: None)
    assert status["outcome"] == "timeout" and status["exit_code"] is None
    assert time.monotonic() - t0 < 20
    assert "started" in status["log_tail"] and (tmp_path / "sleepy.log").exists()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with its process group (dead, or a zombie not yet reaped)
        try:
            if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
                break
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {child} outlived its part")


def test_pytest_s_junit_xml_becomes_tests_json(tmp_path):
    (tmp_path / "test_three.py").write_text(textwrap.dedent("""
        import pytest
        def test_ok(): assert 1 + 1 == 2
        def test_wrong(): assert 1 + 1 == 3, "arithmetic"
        def test_left_out(): pytest.skip("cell lora-kernels not launched")
        """))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_three.py"),
                    "--junitxml", str(tmp_path / "tests.xml")], cwd=tmp_path, capture_output=True, timeout=120)
    got = run.junit_to_json(tmp_path / "tests.xml")
    assert (got["passed"], got["failed"], got["error"], got["skipped"]) == (1, 1, 0, 1)
    wrong = next(t for t in got["tests"] if t["name"] == "test_wrong")
    assert wrong["outcome"] == "failed" and "arithmetic" in wrong["message"]
    assert run.junit_to_json(tmp_path / "none.xml") == {"finished": False, "tests": []}


def _bench(part: str, runs: list[dict], ratios: dict) -> dict:
    return {"bench": "gpu", "parts": {part: {"runs": runs, "ratios": ratios, "finished": True}}}


def test_the_summary_scores_the_parts_against_the_issue_s_targets(tmp_path):
    kernels = {"label": "fast paths + lora_kernels mb=16", "outcome": "ok", "micro_batch": 16,
               "tokens_per_s": 70000.0, "mfu": 0.377, "peak_mem_gb": 51.0, "lora_kernels": {"mlp": 22, "linear": 154},
               "estimate": {"total_gb": 52.0, "error": 0.0196}}
    (tmp_path / "lora-1.1b.json").write_text(json.dumps(_bench("lora-1.1b", [kernels], {"kernels_vs_hf": 1.93})))
    (tmp_path / "qlora-vs-lora-7b.json").write_text(json.dumps(_bench(
        "qlora-7b", [], {"qlora_peak_vs_lora": 0.41, "qlora_tokens_vs_lora": 0.70})))
    (tmp_path / "flow.json").write_text(json.dumps({
        "finished": True, "cells": [{"cell_id": "a", "outcome": "ok", "tokens_per_s": 9000.0, "peak_mem_gb": 9.5}],
        "errors": [{"quantity": "mem_gb", "cells": 4, "median_abs_error": 0.03, "max_abs_error": 0.06, "inside": None},
                   {"quantity": "tokens_per_s", "cells": 4, "median_abs_error": 0.1, "max_abs_error": 0.22,
                    "inside": 0.75}]}))
    (tmp_path / "tests.json").write_text(json.dumps({"passed": 20, "failed": 1, "error": 0, "skipped": 3, "tests": [
        {"name": "test_x[oom]", "outcome": "failed", "message": "assert 'oom' == 'ok'", "seconds": 1.0}]}))
    statuses = [{"part": "tests", "outcome": "ok", "seconds": 100.0, "limit_s": 130},
                {"part": "flow", "outcome": "timeout", "seconds": 130.0, "limit_s": 130}]
    page = summary.build(tmp_path, statuses, "NVIDIA H100 80GB HBM3")
    assert "| LoRA 1.1B MFU >= 40% | 0.377 | not met |" in page
    assert "| LoRA 1.1B kernels >= 1.8x HF Trainer + PEFT (same micro-batch) | 1.930 | met |" in page
    assert "| QLoRA 7B peak <= 0.5x LoRA's | 0.410 | met |" in page
    assert "| QLoRA 7B tokens/s >= 0.75x LoRA's | 0.700 | not met |" in page
    assert "| plan tokens/s within 15% of every flow cell | 0.220 | not met |" in page
    assert "| plan memory within 10% of every flow cell | 0.060 | met |" in page
    assert "| fast paths + lora_kernels mb=16 | ok | 16 | 70,000 | 37.7% | 51.0 | +2.0% | 22 MLPs, 154 projections |" \
        in page
    assert "20 passed, 1 failed, 0 errors, 3 skipped." in page and "- test_x[oom]: failed" in page
    assert "| flow | timeout | 130.0 | 130 |" in page
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["targets"]["QLoRA 7B peak <= 0.5x LoRA's"] == {"value": 0.41, "met": True}


def test_a_wheelhouse_without_a_wheel_is_named_before_anything_runs(tmp_path):
    for name in ("metaflow-2.19.39-py2.py3-none-any.whl", "pydantic-2.14.4-py3-none-any.whl",
                 "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.whl"):
        (tmp_path / name).write_bytes(b"")
    assert environment.missing_wheels(tmp_path) == ["annotated-types", "typing-inspection", "bitsandbytes",
                                                    "liger-kernel"]
    python, problems = environment.python_for(tmp_path, str(tmp_path / "no-python"), dry=True)
    assert problems == [f"{tmp_path / 'no-python'} cannot import {', '.join(environment.NEEDED)}"]


def test_results_go_to_a_folder_named_by_date_and_gpu(tmp_path):
    folder = run.out_folder(tmp_path, "NVIDIA H100 80GB HBM3", dry=False)
    assert folder.parent == tmp_path and folder.name.endswith("-h100") and len(folder.name) == len("2026-12-05-h100")
    assert run.out_folder(tmp_path, None, dry=True).name.endswith("-dry-run")
    assert Path(parts.FLOW_MATRIX).exists()
