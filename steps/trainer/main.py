"""Train and measure one cell, on its own (no Metaflow):

    torchrun --nproc_per_node N -m steps.train --cell CELL.yaml --out DIR [--resume]

Writes DIR/metrics.json whatever happens: outcome `ok` or `diverged` (exit code 0: results),
`oom` (exit code 3) or `error` (exit code 1, with the message), with everything measured until
then. This module owns the process (arguments, signals, the outcome); `loop` owns the training.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import psutil
import torch
import yaml

from steps.plan import catalog, compat
from steps.plan.schema import CellSpec, validate
from steps.results import metrics
from steps.results.metrics import EXIT_ERROR, EXIT_OK, EXIT_OOM, CellMetrics
from steps.trainer import distributed, limits, loop, measure, modeling, tf32, track
from steps.trainer.distributed import Dist
from steps.trainer.liveness import Heartbeat, RankPrefix


class Terminated(Exception):
    """SIGTERM from torchrun (another rank failed) or from the launcher (timeout, hang)."""


def _on_sigterm(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train and measure one matrix cell.")
    parser.add_argument("--cell", required=True, help="cell YAML (one point of a matrix)")
    parser.add_argument("--out", required=True, help="output folder (metrics.json goes here)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    # The `deepspeed` launcher passes each process its local rank; the environment has it too.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def load_cell(path: str) -> CellSpec:
    with open(path, encoding="utf-8") as fh:
        return validate(CellSpec, yaml.safe_load(fh), path)


def main(argv: list[str] | None = None, end_process_group: bool = True) -> int:
    """One cell in this process. end_process_group=False leaves the process group (and the
    groups built on it) up for a caller that trains further cells in the same processes."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank = int(os.environ.get("RANK", 0))
    if os.environ.get("FINETUNE_MATRIX_RANK_PREFIX"):
        sys.stdout, sys.stderr = RankPrefix(sys.stdout, rank), RankPrefix(sys.stderr, rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The launcher sends SIGUSR1 before stopping a hung cell: every thread's Python stack goes
    # to stderr, i.e. into the cell's log, even while the main thread is stuck in a collective.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    beat = Heartbeat(out, rank)
    m = CellMetrics()
    d = None
    trackers = track.Trackers()  # none until the cell is read
    code = EXIT_OK
    try:
        cell = load_cell(args.cell)
        modeling.block_unused_imports([cell])
        m.update(cell_id=cell.cell_id, world_size=cell.world_size, dp_size=cell.dp_size,
                 global_batch=cell.global_batch)
        if reason := compat.refusal(cell):
            raise ValueError(f"this combination cannot run: {reason}")
        instance = catalog.instances().get(cell.instance)
        d = distributed.init(timeout_s=cell.train.timeout_s, gpu=instance is None or not instance.local)
        if d.world != cell.world_size:
            raise ValueError(f"launched with {d.world} processes, cell expects {cell.world_size}")
        if d.device.type == "cuda":  # this cell's peaks (a process may train several cells)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(d.device)
        limits.apply_memory_cap(cell, d.device)
        m.update(versions=metrics.versions(), device=measure.device_name(d.device), tf32=tf32.apply(cell, d))
        libraries = ("transformers", "peft", *(("deepspeed",) if cell.layout.deepspeed else ()))
        baseline = measure.runtime_gb(d.device, libraries)
        trackers = track.Trackers(cell, out, d.is_main)
        try:
            loop.train(cell, d, m, out, args.resume, beat, trackers)
            m.outcome = "ok"
        except loop.Diverged as exc:  # a result: every rank stops at the same step
            m.update(outcome="diverged", error=str(exc), diverged_at_step=exc.step)
            print(f"[rank{rank}] diverged: {exc}", file=sys.stderr, flush=True)
        record_peak_memory(m, d, baseline)
    except BaseException as exc:  # noqa: BLE001 - every failure must become a result
        code = record_failure(m, exc, d)
    trackers.finish(m.outcome or "error", m.to_dict(), m.loss_curve[-1].step if m.loss_curve else 0,
                    m.adapter_dir or None)
    m.trainer_wall_s = time.perf_counter() - t_start
    # Launch to exit as this process sees it (interpreter start and imports included); the
    # launcher replaces it with its own measure, which includes torchrun.
    m.wall_s = time.time() - psutil.Process().create_time()
    if code == EXIT_OK:
        if d.is_main:
            m.write(out / "metrics.json")
        distributed.shutdown(end_process_group)
    else:
        m.write(out / "metrics.json", first_wins=True)  # the first rank to fail reports the cell
    return code


def record_peak_memory(m: CellMetrics, d: Dist, baseline_gb: float) -> None:
    """Every rank's peak, and the largest runtime baseline (collectives: every rank must reach
    them)."""
    peaks = distributed.all_gather_float(measure.peak_memory_gb(d.device), d.device)
    baselines = distributed.all_gather_float(baseline_gb, d.device)
    m.update(peak_mem_gb_per_rank=peaks, peak_mem_gb=max(peaks), runtime_baseline_gb=max(baselines))
    if d.device.type == "cuda":
        m.peak_reserved_gb_per_rank = distributed.all_gather_float(measure.peak_reserved_gb(d.device), d.device)


def record_failure(m: CellMetrics, exc: BaseException, d: Dist | None) -> int:
    """Outcome `oom` or `error` with the message and this rank's peak memory; the exit code."""
    # A second SIGTERM (torchrun stopping the ranks of a failed cell) must not cut the
    # failure report short: the launcher still kills this process after its grace period.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = EXIT_OOM if limits.is_oom(exc) else EXIT_ERROR
    rank = d.rank if d else 0
    peak = measure.peak_memory_gb(d.device if d else torch.device("cpu"))
    m.update(outcome="oom" if code == EXIT_OOM else "error", error=f"{type(exc).__name__}: {exc}"[:2000],
             failed_rank=rank, peak_mem_gb=peak, peak_mem_gb_per_rank=[peak] if d is None or d.world == 1 else None)
    print(f"[rank{rank}] {m.outcome}: {m.error}", file=sys.stderr, flush=True)
    if not isinstance(exc, Terminated):
        traceback.print_exc()
    return code
