"""Is the trainer fast? Side by side on the same model, data, batch and steps:

  (a) this trainer (`torchrun -m steps.train`, as the flow runs it),
  (b) a minimal hand-written PyTorch + PEFT loop,
  (c) Hugging Face `Trainer` + PEFT,

each in its own process (one after the other, same threads), timed after the same warm-up
steps, `--repeats` times in a rotating order. Prints tokens/s and peak memory of each, and the
ratios. tokens/s is tokens per step over the median of every timed step of every repeat: on a
shared machine a few slow steps or a slow repeat (another process, a page-in) would otherwise
decide a comparison whose real differences are a few percent.

    python -m steps.bench                       # ~30M Llama, LoRA r=8, 4 x 256 tokens, fp32
    python -m steps.bench --device cuda --save  # the GPU bench at real shapes (gpu.py)
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

from steps.trainer.bench import common

DEFAULTS = dict(model="llama-30m", steps=30, warmup=5, micro_batch=4, seq_len=256, lr=1e-4, r=8)


def bench_cell(args) -> dict:
    """The cell all three loops train: packed synthetic text, so every row is seq_len tokens."""
    from steps.plan.matrix import cell_id

    settings = {
        "model": args.model, "peft": "lora", "strategy": "single", "lr": args.lr,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "precision": "fp32",
        "train": {"max_steps": args.steps, "timing_warmup_steps": args.warmup, "lr_schedule": "constant",
                  "max_grad_norm": None, "save_adapter": False,
                  "lora_kernels": "false",  # PEFT's modules, as the other two loops run them
                  "lora": {"r": args.r, "alpha": 2 * args.r,
                           "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}},
        "data": {"task": "synthetic-reverse", "packing": True, "train_samples": 4096, "val_samples": 8},
    }
    return {**settings, "cell_id": cell_id(settings)}


def _rows(cell) -> tuple[list, object]:
    """(micro-batches in the order the trainer's steps 0..N-1 take them, the tokenizer)."""
    from steps.trainer import data, modeling

    tok = modeling.load_tokenizer(cell)
    splits = data.build_splits(cell.data, tok, cell.seq_len)
    batches = data.GlobalBatches(splits.train, cell.global_batch, cell.train.seed)
    return [batches.micro_batches(s, 0, 1, cell.micro_batch, tok.pad_id)[0]
            for s in range(cell.train.max_steps)], tok


def _model(cell):
    from steps.trainer import modeling

    tok = modeling.load_tokenizer(cell)
    return modeling.apply_peft(modeling.load_model(cell, tok.vocab_size, __import__("torch").device("cpu")), cell)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def worker_minimal(cell) -> dict:
    """What a person writes first: model(input_ids, labels), backward, step."""
    import torch

    batches, _ = _rows(cell)
    model = _model(cell)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cell.lr)
    times = []
    for b in batches:
        t0 = time.perf_counter()
        labels = b["input_ids"].clone()
        loss = model(input_ids=b["input_ids"], labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return _result(cell, times)


def _result(cell, step_times: list[float], peak_mem_gb: float | None = None) -> dict:
    """tokens/s over the median and the mean timed step; peak memory of this process unless given."""
    timed = step_times[cell.train.timing_warmup_steps:]
    tokens = cell.micro_batch * cell.seq_len
    return {"tokens_per_s": tokens / statistics.median(timed), "tokens_per_s_mean": tokens * len(timed) / sum(timed),
            "peak_mem_gb": _peak_gb() if peak_mem_gb is None else peak_mem_gb, "step_s": timed}


def worker_hf_trainer(cell) -> dict:
    batches, _ = _rows(cell)
    rows = [{"input_ids": r, "labels": r.clone()} for b in batches for r in b["input_ids"]]
    times = common.hf_trainer_step_times(_model(cell), rows, cell, max_grad_norm=0.0, use_cpu=True,
                                         optim="adamw_torch")
    return _result(cell, times)


def run_ours(cell_dict: dict, threads: int) -> dict:
    from steps.plan.schema import CellSpec

    m, _, _ = common.run_trainer(cell_dict, threads, check=True)
    cell = CellSpec.model_validate(cell_dict)
    ends = [p.time_s for p in m.loss_curve]
    times = [b - a for a, b in zip([0.0] + ends, ends)]
    # The trainer's own tokens/s is the mean over its timed steps; the table uses the median.
    return {**_result(cell, times, m.peak_mem_gb), "tokens_per_s_mean": m.tokens_per_s}


def run_worker(kind: str, cell_dict: dict, threads: int) -> dict:
    proc = common.run_worker(["--worker", kind, "--cell-json", json.dumps(cell_dict)], threads, check=True)
    return common.last_json(proc.stdout)


def worker(kind: str, cell_json: str) -> int:
    """A loop other than this trainer, in this process (`python -m steps.bench --worker KIND`)."""
    from steps.plan.schema import CellSpec

    cell = CellSpec.model_validate(json.loads(cell_json))
    print(json.dumps({"minimal": worker_minimal, "hf_trainer": worker_hf_trainer}[kind](cell)))
    return 0


def main(args) -> int:
    """The three loops, `args.repeats` times each in a rotating order; the table, and the
    record (`--json`, `--save`)."""
    cell_dict = bench_cell(args)
    runners = {
        "finetune-matrix trainer": lambda: run_ours(cell_dict, args.threads),
        "minimal PyTorch + PEFT loop": lambda: run_worker("minimal", cell_dict, args.threads),
        "HF Trainer + PEFT": lambda: run_worker("hf_trainer", cell_dict, args.threads),
    }
    results: dict[str, list[dict]] = {name: [] for name in runners}
    names = list(runners)
    for i in range(args.repeats):
        # Interleaved, and each loop takes each place in the order in turn: a machine that
        # drifts during the run then favours none of them.
        for name in names[i % 3:] + names[: i % 3]:
            results[name].append(runners[name]())
    tokens = args.micro_batch * args.seq_len
    pooled = {name: {"tokens_per_s": tokens / statistics.median([t for r in rs for t in r["step_s"]]),
                     "tokens_per_s_mean": statistics.mean(r["tokens_per_s_mean"] for r in rs),
                     "peak_mem_gb": max(r["peak_mem_gb"] for r in rs),
                     "per_repeat": [round(r["tokens_per_s"]) for r in rs]}
              for name, rs in results.items()}
    print_table(pooled, args)
    record = {"settings": vars(args), "results": results, "summary": pooled, **common.environment()}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.save:
        common.save(record, f"bench-{args.model}-{record['device_kind']}")
    return 0


def print_table(summary: dict[str, dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    minimal, hf = (summary[k]["tokens_per_s"] for k in list(summary)[1:])
    table = Table(title=f"{args.model}, LoRA r={args.r}, batch {args.micro_batch} x {args.seq_len}, fp32, "
                        f"{args.steps} steps ({args.warmup} warm-up), {args.threads} threads, "
                        f"{args.repeats} repeat(s)")
    for col in ("loop", "tokens/s", "per repeat", "peak mem GB", "vs minimal", "vs HF Trainer"):
        table.add_column(col, justify="right" if col != "loop" else "left")
    for name, r in summary.items():
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", " ".join(map(str, r["per_repeat"])),
                      f"{r['peak_mem_gb']:.2f}", f"{r['tokens_per_s'] / minimal:.3f}x",
                      f"{r['tokens_per_s'] / hf:.3f}x")
    Console(width=160).print(table)
    print("tokens/s: tokens per step / median of all timed steps of all repeats; "
          "per repeat: the same within each repeat.")

