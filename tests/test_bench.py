"""`python -m steps.bench` runs all three loops on the same cell and prints the comparison."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_compares_the_three_loops(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "steps.bench", "--model", "llama-debug", "--steps", "6", "--warmup", "2",
         "--seq-len", "64", "--repeats", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("finetune-matrix trainer", "minimal PyTorch + PEFT loop", "HF Trainer + PEFT"):
        assert name in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    assert len(summary) == 3 and all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0.1 for r in summary.values())
    assert proc.stdout.count("1.000x") == 2  # minimal and HF Trainer, each against itself
