"""Train and measure one cell, on its own (no Metaflow):

    torchrun --nproc_per_node N -m steps.train --cell CELL.yaml --out DIR

Writes DIR/metrics.json whatever happens: outcome `ok`, `oom` (exit code 3) or `error`
(exit code 1, with the message), with everything measured until then.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
import yaml

from steps import catalog, data, distributed, metrics, modeling, strategies
from steps.metrics import EXIT_ERROR, EXIT_OK, EXIT_OOM
from steps.schema import CellSpec, validate


class Terminated(Exception):
    """SIGTERM from torchrun (another rank failed) or from the launcher (timeout)."""


def _on_sigterm(signum, frame):
    raise Terminated(f"terminated by signal {signum}")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )


def load_cell(path: str) -> CellSpec:
    with open(path, encoding="utf-8") as fh:
        return validate(CellSpec, yaml.safe_load(fh), path)


def lr_lambda(cell: CellSpec):
    warmup, total, kind = cell.train.lr_warmup_steps, cell.train.max_steps, cell.train.lr_schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1 - progress

    return factor


def build_optimizer(params, cell: CellSpec) -> torch.optim.Optimizer:
    if cell.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cell.lr, weight_decay=cell.train.weight_decay)
    return torch.optim.AdamW(params, lr=cell.lr, weight_decay=cell.train.weight_decay)


def autocast(cell: CellSpec, device: torch.device):
    dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(cell.precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def token_loss_sum(module, batch, cell, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over target tokens, and the logits (labels are pre-shifted)."""
    with autocast(cell, device):
        logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=data.IGNORE,
        reduction="sum",
    )
    return loss, logits


@torch.no_grad()
def evaluate(module, examples, cell, d, pad_id: int) -> dict[str, float]:
    """Validation loss per target token; exact-match accuracy of the answer (teacher-forced
    argmax, which equals greedy decoding of the answer) and per-token accuracy."""
    module.eval()
    loss_sum = n_tokens = n_correct_tokens = n_exact = n_seqs = 0.0
    mine = data.shard(examples, d.rank, d.world)
    for k in range(0, len(mine), cell.micro_batch):
        batch = {key: t.to(d.device) for key, t in data.collate(mine[k : k + cell.micro_batch], pad_id).items()}
        loss, logits = token_loss_sum(module, batch, cell, d.device)
        target = batch["labels"] != data.IGNORE
        hit = (logits.argmax(-1) == batch["labels"]) & target
        loss_sum += loss.item()
        n_tokens += target.sum().item()
        n_correct_tokens += hit.sum().item()
        n_exact += (hit.sum(1) == target.sum(1)).sum().item()
        n_seqs += len(batch["labels"])
    module.train()
    loss_sum, n_tokens, n_correct_tokens, n_exact, n_seqs = distributed.all_reduce_sum(
        [loss_sum, n_tokens, n_correct_tokens, n_exact, n_seqs], d.device
    )
    return {
        "val_loss": loss_sum / max(n_tokens, 1),
        "accuracy": n_exact / max(n_seqs, 1),
        "token_accuracy": n_correct_tokens / max(n_tokens, 1),
    }


def train(cell: CellSpec, d: distributed.Dist, m: dict[str, Any]) -> None:
    """The loop. Fills `m` as it goes, so a failure still reports what was measured."""
    tok = modeling.load_tokenizer(cell)
    model = modeling.apply_peft(modeling.load_model(cell, tok.vocab_size), cell).to(d.device)
    trainable, total = modeling.count_parameters(model)
    embedding = model.get_input_embeddings().weight.numel()
    m.update(trainable_params=trainable, total_params=total)
    train_examples, val_examples = data.build_splits(cell.data, tok, cell.seq_len)
    batches = data.GlobalBatches(train_examples, cell.global_batch, cell.train.seed)
    m["steps_per_epoch"] = batches.steps_per_epoch

    wrapped = strategies.wrap(model, cell, d)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cell)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cell))

    curve, log_every = m["loss_curve"], max(1, cell.train.max_steps // 20)
    timed_tokens = timed_s = warm_tokens = warm_s = 0.0
    seq_tokens = seq_count = 0.0
    t_train = time.perf_counter()
    for step in range(cell.train.max_steps):
        t0 = time.perf_counter()
        micro = [{k: t.to(d.device) for k, t in b.items()} for b in
                 batches.micro_batches(step, d.rank, d.world, cell.micro_batch, tok.pad_id)]
        local_targets = sum((b["labels"] != data.IGNORE).sum().item() for b in micro)
        local_tokens = sum(b["attention_mask"].sum().item() for b in micro)
        (n_targets,) = distributed.all_reduce_sum([local_targets], d.device)
        # Gradient of the mean over every target token of the global batch: DDP averages
        # over ranks, so each rank scales its sum by world / global target count.
        scale = d.world / n_targets
        loss_total = 0.0
        for k, batch in enumerate(micro):
            sync = contextlib.nullcontext() if k == len(micro) - 1 else wrapped.no_sync()
            with sync:
                loss, _ = token_loss_sum(wrapped.module, batch, cell, d.device)
                (loss * scale).backward()
            loss_total += loss.item()
        if cell.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cell.train.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, tokens = distributed.all_reduce_sum([loss_total, local_tokens], d.device)
        dt = time.perf_counter() - t0
        if step < cell.train.timing_warmup_steps:
            warm_tokens, warm_s = warm_tokens + tokens, warm_s + dt
        else:
            timed_tokens, timed_s = timed_tokens + tokens, timed_s + dt
            seq_tokens += local_tokens
            seq_count += sum(len(b["input_ids"]) for b in micro)
        loss_value = loss_sum / n_targets
        curve.append({"step": step + 1, "loss": loss_value, "lr": lr, "tokens": tokens,
                      "time_s": time.perf_counter() - t_train})
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step + 1}")
        if d.is_main and ((step + 1) % log_every == 0 or step == 0):
            rate = timed_tokens / timed_s if timed_s else tokens / dt
            print(f"step {step + 1}/{cell.train.max_steps} loss {loss_value:.4f} lr {lr:.2e} "
                  f"tok/s {rate:,.0f}", flush=True)
        if cell.train.eval_every and (step + 1) % cell.train.eval_every == 0:
            m["val_curve"].append({"step": step + 1, **evaluate(wrapped.module, val_examples, cell, d, tok.pad_id)})
    m["train_s"] = time.perf_counter() - t_train
    m["final_train_loss"] = curve[-1]["loss"]
    m["warmup"] = {"steps": min(cell.train.timing_warmup_steps, cell.train.max_steps),
                   "s": warm_s, "tokens_per_s": warm_tokens / warm_s if warm_s else None}
    if timed_s:
        m["tokens_per_s"] = timed_tokens / timed_s
        m["tokens_per_s_per_device"] = m["tokens_per_s"] / d.world
        m["flops_per_token"] = metrics.flops_per_token(
            model.config, trainable, total - trainable, embedding,
            seq_tokens / max(seq_count, 1), full=cell.peft == "full",
        )
        m["achieved_tflops"] = m["tokens_per_s"] * m["flops_per_token"] / 1e12
        peak = catalog.peak_tflops(cell.instance, cell.precision)
        m["mfu"] = m["achieved_tflops"] / (peak * d.world) if peak else None

    t_eval = time.perf_counter()
    result = evaluate(wrapped.module, val_examples, cell, d, tok.pad_id)
    m.update(result, eval_s=time.perf_counter() - t_eval)
    m["val_curve"].append({"step": cell.train.max_steps, **result})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train and measure one matrix cell.")
    parser.add_argument("--cell", required=True, help="cell YAML (one point of a matrix)")
    parser.add_argument("--out", required=True, help="output folder (metrics.json goes here)")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _on_sigterm)
    m: dict[str, Any] = {"cell_id": None, "outcome": "running", "error": None,
                         "loss_curve": [], "val_curve": []}
    d = None
    code = EXIT_OK
    try:
        cell = load_cell(args.cell)
        m.update(cell_id=cell.cell_id, world_size=cell.world_size, global_batch=cell.global_batch)
        d = distributed.init(timeout_s=cell.train.timeout_s)
        if d.world != cell.world_size:
            raise ValueError(f"launched with {d.world} processes, cell expects {cell.world_size}")
        m.update(versions=metrics.versions(), device=metrics.device_name(d.device))
        train(cell, d, m)
        peaks = distributed.all_gather_float(metrics.peak_memory_gb(d.device), d.device)
        m.update(outcome="ok", peak_mem_gb_per_rank=peaks, peak_mem_gb=max(peaks))
        if d.device.type == "cuda":
            m["peak_reserved_gb_per_rank"] = distributed.all_gather_float(
                metrics.peak_reserved_gb(d.device), d.device)
    except BaseException as exc:  # noqa: BLE001 - every failure must become a result
        code = EXIT_OOM if is_oom(exc) else EXIT_ERROR
        m.update(outcome="oom" if code == EXIT_OOM else "error",
                 error=f"{type(exc).__name__}: {exc}"[:2000])
        rank = d.rank if d else 0
        peak = metrics.peak_memory_gb(d.device if d else torch.device("cpu"))
        m.update(failed_rank=rank, peak_mem_gb=peak, peak_mem_gb_per_rank={str(rank): peak})
        print(f"[rank{rank}] {m['outcome']}: {m['error']}", file=sys.stderr, flush=True)
        if not isinstance(exc, Terminated):
            traceback.print_exc()
    m["trainer_wall_s"] = time.perf_counter() - t_start
    # Launch to exit as this process sees it (interpreter start and imports included); the
    # launcher replaces it with its own measure, which includes torchrun.
    m["wall_s"] = time.time() - psutil.Process().create_time()
    if code == EXIT_OK:
        if d is None or d.is_main:
            metrics.write_json_atomic(out / "metrics.json", m)
    else:
        metrics.write_json_atomic(out / "metrics.json", m, first_wins=True)
    if code == EXIT_OK:
        distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
