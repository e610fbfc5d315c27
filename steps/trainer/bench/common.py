"""What the CPU and GPU benches share: this trainer launched as the flow launches it, a loop of
another kind in its own process, Hugging Face `Trainer` timed step by step on rows in a fixed
order, the machine a result was measured on, and where results are kept."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from steps import REPO_ROOT
from steps.results.metrics import CellMetrics, versions

RESULTS_DIR = REPO_ROOT / "reports" / "benchmarks"


def env(threads: int | None = None) -> dict[str, str]:
    """A bench process's environment: `threads` threads (every core by default), this checkout
    first on the path."""
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": str(threads or len(os.sched_getaffinity(0))), "PYTHONPATH": path,
            "TOKENIZERS_PARALLELISM": "false"}


def run_trainer(cell: dict[str, Any], threads: int | None = None,
                check: bool = False) -> tuple[CellMetrics | None, subprocess.CompletedProcess, float]:
    """`torchrun --nproc-per-node 1 -m steps.train` on the cell, in a folder of its own: its
    metrics (None where it wrote none), the process, and its seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        cell_file = Path(tmp) / "cell.json"
        cell_file.write_text(json.dumps(cell))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "steps.train", "--cell", str(cell_file), "--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env(threads), capture_output=True, text=True, check=check)
        return CellMetrics.read(Path(tmp) / "metrics.json"), proc, time.perf_counter() - t0


def run_worker(args: list[str], threads: int | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """`python -m steps.bench ARGS` in its own process: a loop other than this trainer, which
    prints its result as JSON on its last line (`last_json`)."""
    return subprocess.run([sys.executable, "-m", "steps.bench", *args], cwd=REPO_ROOT, env=env(threads),
                          capture_output=True, text=True, check=check)


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def hf_trainer_step_times(model, rows: list[dict], cell, cuda: bool = False, **training_args) -> list[float]:
    """Hugging Face `Trainer` + PEFT on `rows` (one sample each) in their order, the cell's
    micro-batch, steps, learning rate (constant) and seed; every step's seconds, with CUDA
    synchronised at both ends of a step on a GPU. `training_args`: the rest of the
    `TrainingArguments` (device, precision, optimizer, clipping)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cell.micro_batch, max_steps=cell.train.max_steps,
            learning_rate=cell.lr, lr_scheduler_type="constant", logging_strategy="no", save_strategy="no",
            report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=cell.train.seed,
            data_seed=cell.train.seed, **training_args)
        trainer = Trainer(model=model, args=targs, train_dataset=Rows(), callbacks=[clock])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
    return clock.times


def environment() -> dict[str, Any]:
    """When and on what a result was measured: date, device, library versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": gpu or f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
            "device_kind": "gpu" if gpu else "cpu", "versions": versions()}


def save(record: dict[str, Any], name: str) -> Path:
    """Keep a result under reports/benchmarks/ as `<date>-<name>.json`."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{record['date'][:10]}-{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    print(f"saved {path}")
    return path
