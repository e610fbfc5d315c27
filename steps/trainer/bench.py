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
    python -m steps.bench --device cuda --save  # the GPU bench at real shapes (gpu_bench.py)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from steps import REPO_ROOT

DEFAULTS = dict(model="llama-30m", steps=30, warmup=5, micro_batch=4, seq_len=256, lr=1e-4, r=8)


def bench_cell(args) -> dict:
    """The cell all three loops train: packed synthetic text, so every row is seq_len tokens."""
    from steps.plan.matrix import cell_id

    settings = {
        "model": args.model, "peft": "lora", "strategy": "single", "lr": args.lr,
        "micro_batch": args.micro_batch, "seq_len": args.seq_len, "precision": "fp32",
        "train": {"max_steps": args.steps, "timing_warmup_steps": args.warmup, "lr_schedule": "constant",
                  "max_grad_norm": None, "save_adapter": False,
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


def _python_path() -> str:
    return os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))


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
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    batches, _ = _rows(cell)
    rows = [{"input_ids": r, "labels": r.clone()} for b in batches for r in b["input_ids"]]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return rows[i]

    class Clock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cell.micro_batch, max_steps=cell.train.max_steps,
            learning_rate=cell.lr, lr_scheduler_type="constant", max_grad_norm=0.0, logging_strategy="no",
            save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
            optim="adamw_torch", seed=cell.train.seed, data_seed=cell.train.seed,
        )
        trainer = Trainer(model=_model(cell), args=targs, train_dataset=Rows(), callbacks=[clock])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
        trainer.train()
    return _result(cell, clock.times)


def run_ours(cell_dict: dict, threads: int) -> dict:
    from steps.results.metrics import CellMetrics

    with tempfile.TemporaryDirectory() as tmp:
        cell_file = Path(tmp) / "cell.json"
        cell_file.write_text(json.dumps(cell_dict))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "steps.train", "--cell", str(cell_file), "--out", tmp]
        subprocess.run(cmd, cwd=REPO_ROOT, env=_env(threads), check=True, capture_output=True)
        m = CellMetrics.read(Path(tmp) / "metrics.json")
    from steps.plan.schema import CellSpec

    cell = CellSpec.model_validate(cell_dict)
    ends = [p.time_s for p in m.loss_curve]
    times = [b - a for a, b in zip([0.0] + ends, ends)]
    # The trainer's own tokens/s is the mean over its timed steps; the table uses the median.
    return {**_result(cell, times, m.peak_mem_gb), "tokens_per_s_mean": m.tokens_per_s}


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": _python_path(),
            "TOKENIZERS_PARALLELISM": "false"}


def run_worker(kind: str, cell_dict: dict, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "steps.bench", "--worker", kind, "--cell-json", json.dumps(cell_dict)],
                         cwd=REPO_ROOT, env=_env(threads), check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved; the best is kept")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--save", action="store_true",
                        help="keep the results (device, versions, date) in reports/benchmarks/")
    parser.add_argument("--worker", choices=["minimal", "hf_trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--cell-json", help=argparse.SUPPRESS)
    gpu = parser.add_argument_group("--device cuda: the GPU bench at real shapes (steps/trainer/gpu_bench.py)")
    gpu.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    gpu.add_argument("--part", choices=["lora", "qlora", "all"], default="all",
                     help="lora: 1.1B shape, fast paths vs none vs HF Trainer; qlora: QLoRA vs LoRA at the 7B shape")
    gpu.add_argument("--micro-batches", default="16,8,4,2,1", help="micro-batches to try, largest first")
    gpu.add_argument("--qlora-micro-batch", type=int, default=2)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        from steps.trainer import gpu_bench

        if argv is None and "--steps" not in sys.argv:
            args.steps, args.warmup = 20, 5
        return gpu_bench.main(args)

    if args.worker:
        from steps.plan.schema import CellSpec

        cell = CellSpec.model_validate(json.loads(args.cell_json))
        result = {"minimal": worker_minimal, "hf_trainer": worker_hf_trainer}[args.worker](cell)
        print(json.dumps(result))
        return 0

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
    record = {"settings": vars(args), "results": results, "summary": pooled, **environment()}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.save:
        folder = REPO_ROOT / "reports" / "benchmarks"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{record['date'][:10]}-bench-{args.model}-{record['device_kind']}.json"
        path.write_text(json.dumps(record, indent=2))
        print(f"saved {path}")
    return 0


def environment() -> dict:
    import datetime
    import platform

    import torch

    from steps.results.metrics import versions

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": gpu or f"cpu ({platform.machine()}, {len(os.sched_getaffinity(0))} cores)",
            "device_kind": "gpu" if gpu else "cpu", "versions": versions()}


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

