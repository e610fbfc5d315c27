"""Train and measure one cell, on its own (no Metaflow):

    torchrun --nproc_per_node N -m steps.train --cell CELL.yaml --out DIR [--resume]

Writes DIR/metrics.json whatever happens: outcome `ok`, `oom` (exit code 3) or `error`
(exit code 1, with the message), with everything measured until then.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch
import yaml

from steps import catalog, checkpoint, compat, data, distributed, metrics, modeling
from steps.metrics import EXIT_ERROR, EXIT_OK, EXIT_OOM
from steps.parallel import build_engine
from steps.schema import CellSpec, validate


class Terminated(Exception):
    """SIGTERM from torchrun (another rank failed) or from the launcher (timeout, hang)."""


def _on_sigterm(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("out of memory", "can't allocate memory", "not enough memory"))


def load_cell(path: str) -> CellSpec:
    with open(path, encoding="utf-8") as fh:
        return validate(CellSpec, yaml.safe_load(fh), path)


def apply_memory_cap(cell: CellSpec, device: torch.device) -> None:
    """GPU: cap the caching allocator; CPU: cap the process's data segment (malloc fails)."""
    cap = cell.train.memory_cap_gb
    if not cap:
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 1e9 / total), device)
    else:
        prebuild_deepspeed_ops(cell)
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        resource.setrlimit(resource.RLIMIT_DATA, (int(cap * 1e9), hard))


def prebuild_deepspeed_ops(cell: CellSpec) -> None:
    """DeepSpeed compiles its CPU ops (shared-memory collectives, CPU Adam) on first use; a
    compiler started under the memory cap inherits it and fails. Build or load them first."""
    if not cell.strategy.startswith("zero"):
        return
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder

    builders = [ShareMemCommBuilder()] + ([CPUAdamBuilder()] if cell.strategy == "zero3_offload" else [])
    for builder in builders:
        builder.load(verbose=False)


def inject_fault(cell: CellSpec, step: int, rank: int) -> None:
    """`train.fault`: fail on purpose at a step, to test how failures are recorded."""
    fault = cell.train.fault
    if fault is None or fault.at_step != step or fault.rank != rank:
        return
    if fault.kind == "raise":
        raise RuntimeError(f"injected failure at step {step}")
    if fault.kind == "oom":
        raise torch.OutOfMemoryError(f"injected out of memory at step {step}")
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: stop making progress without exiting, like a stuck collective
        time.sleep(3600)


class Heartbeat:
    """Shows the launcher that this rank makes progress, for hang detection.

    Every rank touches its own file (a stuck rank and the ranks waiting for it in a collective
    all go quiet); rank 0 also appends each new loss point to `partial.jsonl`, so a cell
    stopped as `hang` or `timeout` keeps what it measured.
    """

    def __init__(self, out: Path, rank: int):
        self.folder = out / metrics.HEARTBEAT_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path, self.main, self.written = self.folder / f"rank{rank}", rank == 0, {}
        self.beat()

    def beat(self, progress: dict[str, Any] | None = None) -> None:
        self.path.touch()
        if not (self.main and progress):
            return
        lines = []
        for kind in ("loss_curve", "val_curve"):
            points = progress[kind]
            lines += [json.dumps({"curve": kind, **p}) + "\n" for p in points[self.written.get(kind, 0):]]
            self.written[kind] = len(points)
        if lines:
            with open(self.folder.parent / metrics.PARTIAL_CURVES, "a", encoding="utf-8") as fh:
                fh.writelines(lines)


class RankPrefix:
    """Prefix each line written with the rank, as torchrun's `--tee` does ("[default0]:")."""

    def __init__(self, stream, rank: int):
        self.stream, self.prefix, self.at_line_start = stream, metrics.rank_prefix(rank), True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append(self.prefix + piece if self.at_line_start else piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def block_unused_imports(cell: CellSpec) -> None:
    """peft and transformers import bitsandbytes whenever it is installed (about 1 s per
    process); a cell with no 4-bit weights and no 8-bit optimizer makes it look absent."""
    if cell.peft != "qlora" and cell.train.optimizer != "paged_adamw_8bit":
        sys.modules.setdefault("bitsandbytes", None)  # find_spec() then returns None


def new_progress() -> dict[str, Any]:
    return {"loss_curve": [], "val_curve": [], "train_s": 0.0, "timed_tokens": 0.0, "timed_s": 0.0,
            "timed_steps": 0, "warm_tokens": 0.0, "warm_s": 0.0, "seq_tokens": 0.0, "seq_count": 0.0,
            "target": None}


def evaluate(engine, examples, cell: CellSpec, d: distributed.Dist, pad_id: int, eos_id: int,
             has_answers: bool) -> dict[str, float | None]:
    """Validation loss per target token, exact-answer accuracy and per-token accuracy."""
    width, group = engine.eval_shape()
    mine = data.shard(examples, engine.layout.dp_rank, engine.layout.dp_size)
    rows = cell.micro_batch
    per_step = rows * group
    # Every replica runs the same number of eval steps (collectives must match).
    (n_steps,) = distributed.all_reduce_max([math.ceil(len(mine) / per_step)], d.device)
    filler = data.Example(ids=[pad_id, pad_id], target=[False, False])
    engine.eval()
    counts = [0.0] * 5
    for k in range(int(n_steps)):
        chunk = mine[k * per_step : (k + 1) * per_step]
        chunk = chunk + [filler] * (per_step - len(chunk))  # padding rows carry no targets
        micro = [data.to_device(data.collate(chunk[i : i + rows], pad_id, width), d.device)
                 for i in range(0, per_step, rows)]
        counts = [a + b for a, b in zip(counts, engine.eval_step(micro, eos_id))]
    engine.train()
    loss_sum, n_tokens, n_correct, n_exact, n_answered = distributed.all_reduce_sum(counts, d.device)
    return {
        "val_loss": loss_sum / max(n_tokens, 1),
        "accuracy": n_exact / n_answered if has_answers and n_answered else None,
        "token_accuracy": n_correct / max(n_tokens, 1),
    }


def train(cell: CellSpec, d: distributed.Dist, m: dict[str, Any], out: Path, resume: bool,
          beat: Heartbeat) -> None:
    """The loop. Fills `m` as it goes, so a failure still reports what was measured."""
    tok = modeling.load_tokenizer(cell)
    splits = data.build_splits(cell.data, tok, cell.seq_len)
    batches = data.GlobalBatches(splits.train, cell.global_batch, cell.train.seed)
    total_steps = (math.ceil(cell.train.epochs * batches.steps_per_epoch) if cell.train.epochs
                   else cell.train.max_steps)
    m.update(steps_per_epoch=batches.steps_per_epoch, total_steps=total_steps, data_source=splits.source,
             train_examples=len(splits.train), val_examples=len(splits.val))
    engine = build_engine(cell, d, tok.vocab_size, total_steps)
    trainable, total, embedding = engine.param_counts
    m.update(trainable_params=trainable, total_params=total)
    if hasattr(engine, "schedule_name"):
        m["pipeline_schedule"] = engine.schedule_name
    layout = engine.layout
    width, _ = engine.eval_shape()

    # The dataset and model are long-lived: keep them out of the garbage collector's full scans,
    # which otherwise walk every token list of the dataset during training steps.
    gc.collect()
    gc.freeze()
    progress, start = new_progress(), 0
    if resume and (folder := checkpoint.latest(out)) is not None:
        start, progress = checkpoint.load(engine, folder, d)
        m["resumed_from_step"] = start
    m["progress"] = progress  # the live record: a failure still reports it
    beat.beat(progress)
    engine.train()  # from_pretrained returns a model in eval mode (dropout off)
    curve, log_every = progress["loss_curve"], max(1, total_steps // 20)
    t_loop = time.perf_counter()
    paused = 0.0  # evaluation and checkpoint time, kept out of training time

    def train_time() -> float:
        return progress["train_s"] + time.perf_counter() - t_loop - paused

    for step in range(start, total_steps):
        inject_fault(cell, step + 1, d.rank)
        t0 = time.perf_counter()
        micro = [data.to_device(b, d.device) for b in batches.micro_batches(
            step, layout.dp_rank, layout.dp_size, cell.micro_batch, tok.pad_id, width)]
        mine = layout.reports  # ranks sharing a replica's samples count them once
        local_targets = sum((b["labels"] != data.IGNORE).sum().item() for b in micro) if mine else 0
        local_tokens = sum(data.real_tokens(b) for b in micro) if mine else 0
        (n_targets,) = distributed.all_reduce_sum([local_targets], d.device)
        # The gradient of the mean over every target token of the global batch: replicas'
        # gradients are averaged, so each scales its sum by replicas / global target count.
        loss_local = engine.forward_backward(micro, layout.dp_size / n_targets)
        lr = engine.lr()
        engine.optimizer_step()
        loss_sum, tokens = distributed.all_reduce_sum([loss_local, local_tokens], d.device)
        dt = time.perf_counter() - t0
        if step < cell.train.timing_warmup_steps:
            progress["warm_tokens"] += tokens
            progress["warm_s"] += dt
        else:
            progress["timed_tokens"] += tokens
            progress["timed_s"] += dt
            progress["timed_steps"] += 1
            progress["seq_tokens"] += sum(data.real_tokens(b) for b in micro)
            progress["seq_count"] += sum(len(b["input_ids"]) for b in micro)
        loss = loss_sum / n_targets
        curve.append({"step": step + 1, "loss": loss, "lr": lr, "tokens": tokens, "time_s": train_time()})
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {step + 1}")
        if d.is_main and ((step + 1) % log_every == 0 or step == start):
            rate = progress["timed_tokens"] / progress["timed_s"] if progress["timed_s"] else tokens / dt
            print(f"step {step + 1}/{total_steps} loss {loss:.4f} lr {lr:.2e} tok/s {rate:,.0f}", flush=True)
        if cell.train.eval_every and (step + 1) % cell.train.eval_every == 0:
            t_eval = time.perf_counter()
            trained = train_time()
            result = evaluate(engine, splits.val, cell, d, tok.pad_id, tok.eos_id, splits.has_answers)
            progress["val_curve"].append({"step": step + 1, "time_s": trained, **result})
            paused += time.perf_counter() - t_eval
        _check_target(cell, progress)
        if cell.train.checkpoint_every and (step + 1) % cell.train.checkpoint_every == 0:
            t_ck = time.perf_counter()
            checkpoint.save(engine, step + 1, {**progress, "train_s": train_time()}, out, d)
            m["checkpoint_s"] = m.get("checkpoint_s", 0.0) + time.perf_counter() - t_ck
            paused += time.perf_counter() - t_ck
        beat.beat(progress)
    progress["train_s"] = train_time()

    t_eval = time.perf_counter()
    result = evaluate(engine, splits.val, cell, d, tok.pad_id, tok.eos_id, splits.has_answers)
    m.update(result, eval_s=time.perf_counter() - t_eval)
    progress["val_curve"].append({"step": total_steps, "time_s": progress["train_s"], **result})
    _check_target(cell, progress)
    if cell.train.save_adapter and cell.peft != "full":
        m["adapter_dir"] = str(checkpoint.save_adapter(engine, out, d) or "")
    summarize(cell, d, m, progress, engine, (trainable, total, embedding))


def _check_target(cell: CellSpec, progress: dict[str, Any]) -> None:
    """First time the loss reaches train.target_loss (val loss when evaluated during training)."""
    target = cell.train.target_loss
    if target is None or progress["target"] is not None:
        return
    points = progress["val_curve"] if cell.train.eval_every else progress["loss_curve"]
    key = "val_loss" if cell.train.eval_every else "loss"
    for p in points:
        if p[key] <= target:
            tokens = sum(c["tokens"] for c in progress["loss_curve"] if c["step"] <= p["step"])
            progress["target"] = {"step": p["step"], "time_s": p["time_s"], "tokens": tokens}
            return


def summarize(cell, d, m, progress, engine, counts) -> None:
    trainable, total, embedding = counts
    curve = progress["loss_curve"]
    m.update(train_s=progress["train_s"], final_train_loss=curve[-1]["loss"] if curve else None,
             loss_curve=curve, val_curve=progress["val_curve"])
    m["warmup"] = {"steps": min(cell.train.timing_warmup_steps, len(curve)), "s": progress["warm_s"],
                   "tokens_per_s": progress["warm_tokens"] / progress["warm_s"] if progress["warm_s"] else None}
    if progress["timed_s"]:
        step_s = progress["timed_s"] / progress["timed_steps"]
        m["tokens_per_s"] = progress["timed_tokens"] / progress["timed_s"]
        m["tokens_per_s_per_device"] = m["tokens_per_s"] / d.world
        m["step_s"] = step_s
        m["epoch_s"] = step_s * m["steps_per_epoch"]
        m["flops_per_token"] = metrics.flops_per_token(
            engine.config, trainable, total - trainable, embedding,
            progress["seq_tokens"] / max(progress["seq_count"], 1), full=cell.peft == "full")
        m["achieved_tflops"] = m["tokens_per_s"] * m["flops_per_token"] / 1e12
        peak = catalog.peak_tflops(cell.instance, cell.precision)
        m["mfu"] = m["achieved_tflops"] / (peak * d.world) if peak else None
    m["epochs"] = len(curve) / m["steps_per_epoch"] if curve else 0.0
    target = progress["target"]
    m.update(time_to_target_s=target and target["time_s"], tokens_to_target=target and target["tokens"],
             steps_to_target=target and target["step"], target_loss=cell.train.target_loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train and measure one matrix cell.")
    parser.add_argument("--cell", required=True, help="cell YAML (one point of a matrix)")
    parser.add_argument("--out", required=True, help="output folder (metrics.json goes here)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    # The `deepspeed` launcher passes each process its local rank; the environment has it too.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    if os.environ.get("FINETUNE_MATRIX_RANK_PREFIX"):
        rank = int(os.environ.get("RANK", 0))
        sys.stdout, sys.stderr = RankPrefix(sys.stdout, rank), RankPrefix(sys.stderr, rank)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The launcher sends SIGUSR1 before stopping a hung cell: every thread's Python stack goes
    # to stderr, i.e. into the cell's log, even while the main thread is stuck in a collective.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    beat = Heartbeat(out, int(os.environ.get("RANK", 0)))
    m: dict[str, Any] = {"cell_id": None, "outcome": "running", "error": None, "loss_curve": [], "val_curve": []}
    d = None
    code = EXIT_OK
    try:
        cell = load_cell(args.cell)
        block_unused_imports(cell)
        m.update(cell_id=cell.cell_id, world_size=cell.world_size, dp_size=cell.dp_size,
                 global_batch=cell.global_batch)
        if reason := compat.refusal(cell):
            raise ValueError(f"this combination cannot run: {reason}")
        d = distributed.init(timeout_s=cell.train.timeout_s)
        if d.world != cell.world_size:
            raise ValueError(f"launched with {d.world} processes, cell expects {cell.world_size}")
        apply_memory_cap(cell, d.device)
        m.update(versions=metrics.versions(), device=metrics.device_name(d.device))
        train(cell, d, m, out, args.resume, beat)
        peaks = distributed.all_gather_float(metrics.peak_memory_gb(d.device), d.device)
        m.update(outcome="ok", peak_mem_gb_per_rank=peaks, peak_mem_gb=max(peaks))
        if d.device.type == "cuda":
            m["peak_reserved_gb_per_rank"] = distributed.all_gather_float(
                metrics.peak_reserved_gb(d.device), d.device)
    except BaseException as exc:  # noqa: BLE001 - every failure must become a result
        # A second SIGTERM (torchrun stopping the ranks of a failed cell) must not cut the
        # failure report short: the launcher still kills this process after its grace period.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        code = EXIT_OOM if is_oom(exc) else EXIT_ERROR
        rank = d.rank if d else 0
        peak = metrics.peak_memory_gb(d.device if d else torch.device("cpu"))
        m.update(outcome="oom" if code == EXIT_OOM else "error", error=f"{type(exc).__name__}: {exc}"[:2000],
                 failed_rank=rank, peak_mem_gb=peak, peak_mem_gb_per_rank=[peak] if d is None or d.world == 1 else None)
        progress = m.pop("progress", None)
        if progress is not None:  # what was measured until the failure
            m.update(loss_curve=progress["loss_curve"], val_curve=progress["val_curve"])
        print(f"[rank{rank}] {m['outcome']}: {m['error']}", file=sys.stderr, flush=True)
        if not isinstance(exc, Terminated):
            traceback.print_exc()
    m.pop("progress", None)
    m["trainer_wall_s"] = time.perf_counter() - t_start
    # Launch to exit as this process sees it (interpreter start and imports included); the
    # launcher replaces it with its own measure, which includes torchrun.
    m["wall_s"] = time.time() - psutil.Process().create_time()
    if code == EXIT_OK:
        if d is None or d.is_main:
            metrics.write_json_atomic(out / "metrics.json", m)
        distributed.shutdown()
    else:
        metrics.write_json_atomic(out / "metrics.json", m, first_wins=True)
    return code


if __name__ == "__main__":
    code = main()
    # Everything is written: skip the interpreter's teardown of torch and friends (about a
    # second per process, paid by every cell).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
