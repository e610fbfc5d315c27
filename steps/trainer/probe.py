"""The device measured instead of assumed: what the planner needs to know about this machine
before a cell runs, timed on the cell's own shapes in a few seconds.

    python -m steps.trainer.probe REQUESTS.json ANSWERS.json

The planner (`steps.estimate.probe`) asks, and caches the answers per machine and library
versions; this module only measures, so that planning itself never imports torch.

- `step`: the cell itself, with its model cut to a few decoder layers (its configuration,
  adapter, precision and strategy, random weights), trained for a few steps by the trainer's own
  engine on the cell's own micro-batches (the trainer's data code: real widths, real tokens per
  row), every rank at once, so that the collectives of its world size over gloo or NCCL, the
  optimizer and the launches of small kernels are in the time. Two depths: their difference is
  one layer's share of a micro-batch's forward and backward, of the optimizer step and of an
  evaluation forward; what is left is the embedding, the head, the loss and the step's fixed cost.
  A single-process cell is timed as `copies` of it side by side, as the matrix will run them.
- `startup`: a fresh interpreter importing the trainer (and DeepSpeed where the cell uses it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from steps import REPO_ROOT
from steps.plan.schema import CellSpec
from steps.trainer import data, modeling, tf32
from steps.trainer.distributed import Dist

WARM, REPS = 5, 20  # untimed steps (the trainer's timing warm-up), timed ones at most
TIMEOUT_S = 180.0  # a cell whose probe hangs (a collective that never completes) is planned without it
BUDGET_S = 6.0  # fewer timed repetitions (two at least) where the two depths' steps are slow
DATA_SAMPLES = 512  # examples read to learn the widths and real tokens of the cell's rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _splits(cell: CellSpec) -> tuple[data.Splits, data.GlobalBatches, float]:
    """The cell's first examples as the trainer builds them, its global batches, and the seconds
    they took."""
    t0 = time.perf_counter()
    tok = modeling.load_tokenizer(cell)
    n = max(min(cell.data.train_samples or DATA_SAMPLES, DATA_SAMPLES), 2 * cell.global_batch)
    settings = cell.data.model_copy(update={"train_samples": n, "val_samples": min(cell.data.val_samples or 8, 8)})
    splits = data.build_splits(settings, tok, cell.seq_len)
    batches = data.GlobalBatches(splits.train, cell.global_batch, cell.train.seed)
    return splits, batches, time.perf_counter() - t0


def _rows(cell: CellSpec, batches: data.GlobalBatches, width: int | None) -> tuple[float, float]:
    """The mean width the cell's micro-batches are padded to, and its real tokens per row, over
    its first steps."""
    widths, real = [], []
    for step in range(min(batches.steps_per_epoch, 64)):
        mine = batches.replica_examples(step, 0, cell.dp_size)
        for k in range(0, len(mine), cell.micro_batch):
            rows = mine[k : k + cell.micro_batch]
            widths.append(width or max(len(e.ids) for e in rows))
            real.extend(len(e.ids) for e in rows)
    return statistics.mean(widths), statistics.mean(real)


def _time(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun gives a rank (a cell of one process: a group of its own)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


class _Depth:
    """The cell's engine with `layers` decoder layers, its loop and its evaluation batches."""

    def __init__(self, cell: CellSpec, layers: int, tok, splits: data.Splits, batches: data.GlobalBatches,
                 d: Dist, out: Path):
        from steps.results.metrics import CellMetrics
        from steps.trainer.engines import build_engine
        from steps.trainer.liveness import Heartbeat
        from steps.trainer.loop import Loop
        from steps.trainer.progress import Progress

        self.tok, self.device, micro = tok, d.device, cell.micro_batch
        t0 = time.perf_counter()
        with modeling.layer_count(layers):
            self.engine = build_engine(cell, d, self.tok.vocab_size, total_steps=10_000)
        self.build_s = time.perf_counter() - t0
        self.loop = Loop(self.engine, self.tok, splits, batches, 10_000, CellMetrics(), out, Heartbeat(out, d.rank),
                         Progress())
        width, self.group = self.engine.eval_shape()
        self.evals = [data.to_device(data.collate(splits.train[k * micro : (k + 1) * micro], tok.pad_id, width),
                                     d.device) for k in range(self.group)]
        self.steps: list[float] = []
        self.ev: list[float] = []
        self.engine.train()

    def rep(self, n: int, clock, keep: bool) -> None:
        """One of the trainer's own optimizer steps (`Loop.step`: its micro-batches built, forward
        and backward over `grad_accum` of them, the gradients synchronised, clipped and applied,
        the loss reduced) and one evaluation forward per micro-batch, timed."""
        from steps.trainer.loop import Diverged

        progress = self.loop.progress
        try:
            t_step = _time(lambda: self.loop.step(n, clock, log=False), self.device)
        except Diverged:  # random weights at the cell's learning rate: the time still counts
            t_step = progress.timed_s / max(progress.timed_steps, 1) if keep else 0.0
        self.engine.eval()
        t_ev = _time(lambda: self.engine.eval_step(self.evals, self.tok.eos_id), self.device)
        self.engine.train()
        if keep:
            self.steps.append(t_step)
            self.ev.append(t_ev / self.group)

    def result(self) -> dict[str, Any]:
        # The mean, as the trainer reports its timed steps: the odd slow step counts. The
        # repetitions too, for the depths' difference (`_layer_share`).
        return {"step": statistics.mean(self.steps), "ev": statistics.mean(self.ev), "build": self.build_s,
                "reps": {"step": self.steps, "ev": self.ev}}


def _layer_share(one: dict[str, Any], two: dict[str, Any], part: str) -> float:
    """The deeper cut's extra time: the median of the paired repetitions' differences (they
    alternate, so each pair saw the same load), not the difference of the means, which one slow
    repetition of the shallow cut on a busy machine turns negative."""
    if part not in one["reps"]:
        return two[part] - one[part]
    return statistics.median(b - a for a, b in zip(one["reps"][part], two["reps"][part], strict=True))


def _measure(cell: CellSpec, depths: tuple[int, int], tok, splits: data.Splits, batches: data.GlobalBatches,
             d: Dist, out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of a step, of an evaluation forward per micro-batch and of the build at both
    depths. Their repetitions alternate, so that a load that comes and goes on the machine
    slows both alike and stays out of their difference (a layer's share)."""
    from steps.trainer import distributed
    from steps.trainer.loop import TrainClock

    pair = [_Depth(cell, n, tok, splits, batches, d, out / str(n)) for n in depths]
    clock, deadline = TrainClock(0.0), time.perf_counter() + BUDGET_S
    for rep in range(WARM + REPS):
        for depth in pair:
            depth.rep(rep + 1, clock, keep=rep >= WARM)
        # Every rank stops at the same step (the next one would wait in a collective).
        late = float(rep >= WARM + 1 and time.perf_counter() > deadline)
        if rep >= WARM and distributed.all_reduce_max([late], d.device)[0]:
            break
    return pair[0].result(), pair[1].result()


def _step_rank(rank: int, request: dict[str, Any], ports: list[int], answer: str) -> None:
    """One process of the probe: a rank of the cell, or one of `copies` cells side by side."""
    from steps.trainer import distributed

    cell = CellSpec.model_validate(request["cell"])
    cores = request.get("cores") or []
    if cores:
        os.sched_setaffinity(0, cores[rank % len(cores)])
    torch.set_num_threads(int(request.get("threads") or 1))
    alone = cell.world_size == 1  # a copy: its own group of one
    _rank_env(0 if alone else rank, cell.world_size, ports[rank] if alone else ports[0])
    d = distributed.init(timeout_s=600, gpu=request.get("device") == "gpu")
    tf32.apply(cell, d)  # its matmuls as the cell will run them
    splits, batches, data_s = _splits(cell)
    first, second = request["layers"]
    from steps.trainer.engines import build_engine

    tok = modeling.load_tokenizer(cell)  # once for the builds (the data's own load is in data_s)
    with modeling.layer_count(first):  # the first build loads the model's classes: not a build's cost
        build_engine(cell, d, tok.vocab_size, total_steps=10)
    with tempfile.TemporaryDirectory() as tmp:
        one, two = _measure(cell, (first, second), tok, splits, batches, d, Path(tmp))
        width, real = _rows(cell, batches, cell.seq_len if cell.layout.model_split == "pipeline" else None)
    out: dict[str, float] = {"row_width": width, "row_real_tokens": real, "data_s": data_s}
    for part in ("step", "ev", "build"):
        layer = max(_layer_share(one, two, part), 0.0) / (second - first)
        out[f"{part}_layer_s"], out[f"{part}_base_s"] = layer, max(one[part] - first * layer, 0.0)
    if rank == 0:
        Path(answer).write_text(json.dumps(out))
    distributed.shutdown()


def step(request: dict[str, Any]) -> dict[str, float]:
    """A decoder layer's share and the rest of the cell's step on this device: all the cell's
    ranks at once (or `copies` single-process cells side by side, as a matrix runs them)."""
    import torch.multiprocessing as mp

    cell = CellSpec.model_validate(request["cell"])
    procs = cell.world_size if cell.world_size > 1 else int(request.get("copies") or 1)
    with tempfile.TemporaryDirectory() as tmp:
        answer = os.path.join(tmp, "answer.json")
        context = mp.start_processes(_step_rank, args=(request, [_free_port() for _ in range(procs)], answer),
                                     nprocs=procs, join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not context.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the probe of this cell took over {TIMEOUT_S:.0f} s")
        finally:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
        return json.loads(Path(answer).read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(request: dict[str, Any]) -> dict[str, float]:
    """Seconds a fresh interpreter takes to import the trainer (the quicker of two: the second
    reads warm files, as a matrix's cells do)."""
    modules = ", ".join(request.get("modules") or ["steps.trainer.main"])
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {modules}"], cwd=REPO_ROOT, check=True,
                       capture_output=True, timeout=300)
        runs.append(time.perf_counter() - t0)
    return {"import_s": min(runs)}


KINDS = {"step": step, "startup": startup}


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    requests = json.loads(Path(args[0]).read_text())
    answers: dict[str, dict[str, Any]] = {}
    for kind, items in requests.items():
        for item in items:
            try:
                answers[item["key"]] = {"kind": kind, **KINDS[kind](item)}
            except Exception as exc:  # noqa: BLE001 - an unmeasurable shape is planned without its probe
                answers[item["key"]] = {"kind": kind, "error": f"{type(exc).__name__}: {exc}"}
            print(f"probe {kind} {item['key'][:12]}: {json.dumps(answers[item['key']])[:200]}",
                  file=sys.stderr, flush=True)
    Path(args[1]).write_text(json.dumps(answers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
