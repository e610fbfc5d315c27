"""One rank's training run: the global batches through the engine step by step, evaluations
and checkpoints between steps, the loss target, and the summary of what was measured.

Every rank runs the same steps (their collectives must match); the loss and token counts are
sums over ranks, so every rank holds the same curve and rank 0 reports it.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

from steps.plan import catalog
from steps.plan.schema import CellSpec
from steps.results.metrics import CellMetrics, LossPoint, ValPoint, Warmup
from steps.trainer import checkpoint, data, distributed, measure, modeling
from steps.trainer.distributed import Dist
from steps.trainer.engines import build_engine
from steps.trainer.engines.base import Engine, ModelFacts
from steps.trainer.engines.optim import fused
from steps.trainer.limits import inject_fault
from steps.trainer.liveness import Heartbeat
from steps.trainer.progress import Progress
from steps.trainer.tokenizer import Tokenizer
from steps.trainer.track import Trackers


def train(cell: CellSpec, d: Dist, m: CellMetrics, out: Path, resume: bool, beat: Heartbeat,
          trackers: Trackers | None = None) -> None:
    """Train the cell and summarize it into `m`, which is filled as it goes: a failure still
    reports what was measured until then."""
    tok = modeling.load_tokenizer(cell)
    splits = data.build_splits(cell.data, tok, cell.seq_len)
    batches = data.GlobalBatches(splits.train, cell.global_batch, cell.train.seed)
    total_steps = (math.ceil(cell.train.epochs * batches.steps_per_epoch) if cell.train.epochs
                   else cell.train.max_steps)
    m.update(steps_per_epoch=batches.steps_per_epoch, total_steps=total_steps, data_source=splits.source,
             train_examples=len(splits.train), val_examples=len(splits.val), train_examples_cut=splits.train_cut,
             train_target_tokens=splits.train_target_tokens)
    engine = build_engine(cell, d, tok.vocab_size, total_steps)
    m.update(trainable_params=engine.facts.trainable, total_params=engine.facts.total,
             lora_targets=list(engine.facts.adapted) or None, pipeline_schedule=engine.schedule_name,
             weights_dtype=engine.facts.weights_dtype, trainable_dtype=engine.facts.trainable_dtype,
             attn_implementation=getattr(engine.facts.config, "_attn_implementation", None),
             fused_optimizer=fused(cell, engine.params), lora_kernels=engine.facts.lora_kernels,
             lora_kernels_off=engine.facts.lora_kernels_off)
    # The dataset and model are long-lived: keep them out of the garbage collector's full scans,
    # which otherwise walk every token list of the dataset during training steps.
    gc.collect()
    gc.freeze()
    start, progress = 0, Progress()
    if resume and (folder := checkpoint.latest(out)) is not None:
        start, progress = checkpoint.load(engine, folder, d)
        m.resumed_from_step = start
    loop = Loop(engine, tok, splits, batches, total_steps, m, out, beat, progress, trackers)
    try:
        loop.run(start)
        loop.finish()
        summarize(cell, d, m, progress, engine.facts)
        record_gpu_samples(m, d, loop.gpu)
    except Diverged:
        summarize(cell, d, m, progress, engine.facts)  # its speed and curve until it diverged
        raise
    except BaseException:
        m.update(loss_curve=progress.loss_curve, val_curve=progress.val_curve)  # the curves so far
        raise


class Diverged(Exception):
    """The loss is not finite, or `diverge_factor` times its first after the learning rate's
    warm-up: outcome `diverged`, a result (every rank holds the same loss and stops at once)."""

    def __init__(self, step: int, loss: float, first: float, factor: float | None):
        self.step = step
        why = ("is not finite" if not math.isfinite(loss) else
               f"is over {factor:g} x the first loss {first:.4g}")
        super().__init__(f"the loss {loss:.4g} at step {step} {why}: stopped as diverged")


def check_divergence(cell: CellSpec, step: int, loss: float, first: float) -> None:
    """Raise `Diverged` where the cell's loss at `step` says the run has diverged."""
    factor = cell.train.diverge_factor
    warm = step > max(cell.train.lr_warmup_steps, 1)
    if not math.isfinite(loss) or (factor and warm and math.isfinite(first) and loss > factor * first):
        raise Diverged(step, loss, first, factor)


class TrainClock:
    """Training time: what a resumed run had trained before, plus this run's time in the loop
    without its evaluations and checkpoints."""

    def __init__(self, before: float):
        self.before, self.started, self.excluded = before, time.perf_counter(), 0.0

    def now(self) -> float:
        return self.before + time.perf_counter() - self.started - self.excluded

    def exclude_since(self, t0: float) -> float:
        """Leave the time since `t0` (a perf_counter reading) out of training time; return it."""
        spent = time.perf_counter() - t0
        self.excluded += spent
        return spent


class Loop:
    """The steps of one run on this rank, and what happens between them."""

    def __init__(self, engine: Engine, tok: Tokenizer, splits: data.Splits, batches: data.GlobalBatches,
                 total_steps: int, m: CellMetrics, out: Path, beat: Heartbeat, progress: Progress,
                 trackers: Trackers | None = None):
        self.engine, self.cell, self.d = engine, engine.cell, engine.d
        self.tok, self.splits, self.batches, self.total_steps = tok, splits, batches, total_steps
        # The last step this run trains: an economy speed cell stops early on the full run's schedule.
        self.last_step = min(total_steps, engine.cell.train.stop_after_steps or total_steps)
        self.m, self.out, self.beat, self.progress = m, out, beat, progress
        self.width = engine.eval_shape()[0]  # pipelines pad every batch to one width
        self.log_every = max(1, total_steps // 20)
        self.gpu = measure.GpuSampler(self.d.device)  # NVML, during the timed steps only
        self.load = measure.MachineLoad()  # the machine's other work in the timed steps (rank 0 reads it)
        self.track = trackers or Trackers()  # rank 0's MLflow / W&B / TensorBoard runs

    def run(self, start: int) -> None:
        """Steps start+1 .. last_step (numbered from 1), evaluating, checking the target and
        checkpointing after each as the cell asks."""
        progress = self.progress
        self.beat.beat(progress)
        self.engine.train()  # from_pretrained returns a model in eval mode (dropout off)
        clock = TrainClock(progress.train_s)
        try:
            self._steps(start, clock)
        finally:
            self.gpu.stop()
            self.load.stop()
            self.m.update(**self.load.fields())  # a failed cell keeps what was measured too
            progress.train_s = clock.now()

    def _steps(self, start: int, clock: TrainClock) -> None:
        train, progress = self.cell.train, self.progress
        evaluating = train.evaluate and train.eval_every
        for n in range(start + 1, self.last_step + 1):
            inject_fault(self.cell, n, self.d.rank)
            if n > train.timing_warmup_steps:
                self.gpu.start()
                if self.d.is_main:
                    self.load.start()  # once: evaluations and checkpoints inside the window are the cell's own work
            self.step(n, clock, log=n % self.log_every == 0 or n == start + 1)
            if (evaluating and n % train.eval_every == 0) or (
                    train.checkpoint_every and n % train.checkpoint_every == 0):
                self.gpu.stop()
            if evaluating and n % train.eval_every == 0:
                t_eval = time.perf_counter()
                progress.val_curve.append(self.evaluate(n, clock.now()))
                clock.exclude_since(t_eval)
            progress.check_target(train.target_loss, on_val=bool(evaluating))
            if train.checkpoint_every and n % train.checkpoint_every == 0:
                t_save = time.perf_counter()
                progress.train_s = clock.now()
                checkpoint.save(self.engine, n, progress, self.out, self.d)
                self.m.checkpoint_s = (self.m.checkpoint_s or 0.0) + clock.exclude_since(t_save)
            self.beat.beat(progress)

    def step(self, n: int, clock: TrainClock, log: bool) -> None:
        """Optimizer step `n` on the global batch; its point goes on the loss curve."""
        engine, cell, d, place = self.engine, self.cell, self.d, self.engine.place
        t0 = time.perf_counter()
        micro = [data.to_device(b, d.device) for b in self.batches.micro_batches(
            n - 1, place.dp_rank, cell.dp_size, cell.micro_batch, self.tok.pad_id, self.width)]
        real = sum(data.real_tokens(b) for b in micro)
        # Ranks that share a replica's samples (tensor peers, pipeline stages) count them once.
        local_targets = sum((b["labels"] != data.IGNORE).sum().item() for b in micro) if place.reports else 0
        (n_targets,) = distributed.all_reduce_sum([local_targets], d.device)
        # The gradient of the mean over every target token of the global batch: replicas'
        # gradients are averaged, so each scales its sum by replicas / global target count.
        loss_local = engine.forward_backward(micro, cell.dp_size / n_targets)
        lr = engine.lr()
        engine.optimizer_step()
        loss_sum, tokens = distributed.all_reduce_sum([loss_local, real if place.reports else 0], d.device)
        measure.synchronize(d.device)
        dt = time.perf_counter() - t0
        loss = loss_sum / n_targets
        point = LossPoint(step=n, loss=loss, lr=lr, tokens=tokens, time_s=clock.now())
        self.progress.add_step(point, dt, warm=n <= cell.train.timing_warmup_steps, seq_tokens=real,
                               sequences=sum(len(b["input_ids"]) for b in micro))
        rate = self.progress.tokens_per_s if self.progress.timed_s else tokens / dt
        if self.track.active:
            self.track.step(point, rate, measure.peak_memory_gb(d.device))
        check_divergence(cell, n, loss, self.progress.loss_curve[0].loss)
        if d.is_main and log:
            print(f"step {n}/{self.total_steps} loss {loss:.4f} lr {lr:.2e} tok/s {rate:,.0f}", flush=True)

    def evaluate(self, step: int, time_s: float) -> ValPoint:
        """Validation loss per target token, exact-answer accuracy and per-token accuracy, at
        `step`, after `time_s` of training."""
        engine, cell, d, pad_id = self.engine, self.cell, self.d, self.tok.pad_id
        width, group = engine.eval_shape()
        mine = data.shard(self.splits.val, engine.place.dp_rank, cell.dp_size)
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
            counts = [a + b for a, b in zip(counts, engine.eval_step(micro, self.tok.eos_id), strict=True)]
        engine.train()
        loss_sum, n_tokens, n_correct, n_exact, n_answered = distributed.all_reduce_sum(counts, d.device)
        point = ValPoint(step=step, time_s=time_s, val_loss=loss_sum / max(n_tokens, 1),
                        accuracy=n_exact / n_answered if self.splits.has_answers and n_answered else None,
                        token_accuracy=n_correct / max(n_tokens, 1))
        self.track.evaluate(point)
        return point

    def finish(self) -> None:
        """The final evaluation (on the curve too) and the trained adapter."""
        cell, m, progress = self.cell, self.m, self.progress
        if not cell.train.evaluate:  # a speed cell: its class's quality run validates
            return
        t_eval = time.perf_counter()
        final = self.evaluate(self.last_step, progress.train_s)
        m.update(val_loss=final.val_loss, accuracy=final.accuracy, token_accuracy=final.token_accuracy,
                 eval_s=time.perf_counter() - t_eval)
        progress.val_curve.append(final)
        progress.check_target(cell.train.target_loss, on_val=bool(cell.train.eval_every))
        if cell.train.save_adapter and cell.peft != "full":
            m.adapter_dir = str(checkpoint.save_adapter(self.engine, self.out, self.d) or "")


def summarize(cell: CellSpec, d: Dist, m: CellMetrics, progress: Progress, facts: ModelFacts) -> None:
    """The cell's curves, throughput, FLOPs, epochs and goodput, from what the run measured."""
    curve = progress.loss_curve
    m.update(train_s=progress.train_s, final_train_loss=curve[-1].loss if curve else None,
             loss_curve=curve, val_curve=progress.val_curve,
             warmup=Warmup(steps=min(cell.train.timing_warmup_steps, len(curve)), s=progress.warm_s,
                           tokens_per_s=progress.warm_tokens_per_s))
    if progress.timed_s:
        tokens_per_s = progress.tokens_per_s
        flops = measure.flops_per_token(facts.config, facts.trainable, facts.total - facts.trainable,
                                        facts.embedding, progress.mean_seq_tokens, full=cell.peft == "full")
        # The catalog's peak is the instance's GPU's: a GPU cell that ran on a CPU has no MFU. An
        # fp32 cell whose matmuls ran on TF32 tensor cores is measured against their peak.
        on_gpu = d.device.type == "cuda"
        peak = catalog.peak_tflops(cell.instance, cell.precision, bool(m.tf32)) if on_gpu else None
        achieved = tokens_per_s * flops / 1e12
        m.update(tokens_per_s=tokens_per_s, tokens_per_s_per_device=tokens_per_s / d.world, step_s=progress.step_s,
                 epoch_s=progress.step_s * m.steps_per_epoch, flops_per_token=flops, achieved_tflops=achieved,
                 mfu=achieved / (peak * d.world) if peak else None)
    target = progress.target
    m.update(epochs=len(curve) / m.steps_per_epoch if curve else 0.0, target_loss=cell.train.target_loss,
             time_to_target_s=target.time_s if target else None, tokens_to_target=target.tokens if target else None,
             steps_to_target=target.step if target else None)


def record_gpu_samples(m: CellMetrics, d: Dist, gpu: measure.GpuSampler) -> None:
    """Every rank's NVML utilisation and memory in use over the timed steps (a collective on GPU
    ranks; nothing on CPU)."""
    if d.device.type != "cuda":
        return
    util = distributed.all_gather_float(_or_nan(gpu.mean_util_pct), d.device)
    used = distributed.all_gather_float(_or_nan(gpu.max_used_gb), d.device)
    if all(math.isfinite(u) for u in util):
        m.update(gpu_util_pct_per_rank=util, gpu_util_pct=sum(util) / len(util))
    if all(math.isfinite(u) for u in used):
        m.gpu_mem_used_gb_per_rank = used


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value
