"""The GPU bench: `python -m steps.bench --device cuda` (random weights at real shapes, nothing
downloaded; one GPU).

  lora   the TinyLlama-1.1B shape, LoRA r=16 on every linear layer, bf16-mixed, sequence 2048,
         packed rows, the largest micro-batch that fits (tried from the top): this trainer with
         its fast paths (fused AdamW, compiled layers, Liger kernels with its fused linear
         cross-entropy), without them, and Hugging Face `Trainer` + PEFT on the same model,
         rows and batch.
  qlora  the Llama-2-7B shape: QLoRA against LoRA at one micro-batch (fused AdamW and Liger for
         both; compile does not take bitsandbytes' layers).

Each run is its own process. Prints tokens/s, MFU (4N + 6N_trainable), peak memory and the
ratios, and the memory budget's estimate against the measured peak allocated; `--save` keeps
it all under reports/benchmarks/. `--runs fixed` (what `make gpu-evidence` runs): the micro-
batches the H100 fitted (16 with the fast paths, 8 without) instead of searching for them, the
`lora_kernels` runs first; `--json` is rewritten after every run, so a part stopped at its time
limit keeps the runs it finished.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from steps.trainer.bench import common

SEQ = 2048


_SAVE = None  # called with each finished run (`--json`: the file is rewritten)


def _saved(run: dict) -> dict:
    """A finished run, handed to `_SAVE` where a part keeps its runs as they come."""
    if _SAVE is not None:
        _SAVE(run)
    return run


def bench_cell(model: str, peft: str, micro_batch: int, fast: bool, steps: int, warmup: int,
               compile_layers: bool = True, init_device: str = "cpu", kernels: bool = False) -> dict:
    """`fast`: fused AdamW, Liger, the chunked loss and (`compile_layers`) compiled layers;
    `kernels`: `train.lora_kernels` (compile off: the two do not combine)."""
    from steps.plan.matrix import cell_id

    rows = micro_batch * steps + 8
    settings = {
        "model": model, "peft": peft, "strategy": "single", "instance": "local-gpu", "lr": 1e-4,
        "micro_batch": micro_batch, "seq_len": SEQ, "precision": "bf16-mixed",
        "train": {"init": "random", "init_device": init_device, "tokenizer": "byte", "max_steps": steps,
                  "timing_warmup_steps": warmup,
                  "lr_schedule": "constant", "save_adapter": False, "attn_implementation": "sdpa",
                  "fused_optimizer": "auto" if fast else "off",
                  "compile": "layers" if fast and compile_layers and not kernels else "off", "liger": fast,
                  "lora_kernels": "true" if kernels else "false",  # false: PEFT's modules, for the comparison
                  "loss": "chunked" if fast else "logits",
                  "timeout_s": 1200, "hang_after_s": 600,
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        # synthetic-reverse examples are ~40 bytes: enough of them to fill `rows` packed rows
        "data": {"task": "synthetic-reverse", "packing": True, "train_samples": rows * SEQ // 30,
                 "val_samples": 4},
    }
    return {**settings, "cell_id": cell_id(settings)}


def run_trainer(cell: dict, label: str) -> dict:
    """This trainer on one GPU, as the flow launches it; its metrics (an `oom` too)."""
    m, proc, seconds = common.run_trainer(cell)
    if m is None:  # the trainer died before writing its metrics: a result, the next run still runs
        print(f"  {label}: no metrics (exit {proc.returncode})", flush=True)
        return _saved({"label": label, "outcome": "error", "micro_batch": cell["micro_batch"], "wall_s": seconds,
                       "error": f"no metrics (exit {proc.returncode})\n{proc.stderr[-3000:]}"})
    out = {"label": label, "outcome": m.outcome, "error": m.error, "wall_s": seconds,
           "micro_batch": cell["micro_batch"], "tokens_per_s": m.tokens_per_s, "mfu": m.mfu,
           "peak_mem_gb": m.peak_mem_gb, "peak_reserved_gb": (m.peak_reserved_gb_per_rank or [None])[0],
           "gpu_util_pct": m.gpu_util_pct, "step_s": m.step_s, "trainable_params": m.trainable_params,
           "total_params": m.total_params, "flops_per_token": m.flops_per_token,
           "losses": [p.loss for p in m.loss_curve], "weights_dtype": m.weights_dtype}
    if m.outcome == "ok":
        out["estimate"] = memory_estimate(cell, m)
    out["lora_kernels"] = m.lora_kernels
    print(f"  {label}: {m.outcome} mb={cell['micro_batch']} tok/s={m.tokens_per_s or 0:,.0f} "
          f"mfu={m.mfu or 0:.3f} peak={m.peak_mem_gb or 0:.1f} GB ({seconds:.0f} s)", flush=True)
    return _saved(out)


def memory_estimate(cell: dict, m) -> dict:
    """The report's memory budget for this cell, by part, in GB, against the measured peak."""
    from steps.estimate import memory
    from steps.plan import catalog

    row = {"peft": cell["peft"], "precision": cell["precision"], "seq_len": cell["seq_len"],
           "micro_batch": cell["micro_batch"], "total_params": m.total_params,
           "trainable_params": m.trainable_params, "strategy": "single", "world_size": 1,
           "instance": cell["instance"], "attn_implementation": m.attn_implementation,
           "lora_targets": m.lora_targets, "train.optimizer": "adamw", "train.gradient_checkpointing": False,
           "train.liger": cell["train"]["liger"], "train.compile": cell["train"]["compile"],
           "train.lora.r": cell["train"]["lora"]["r"], "train.lora.dropout": cell["train"]["lora"]["dropout"],
           "train.loss": cell["train"]["loss"], "train.lora_kernels": cell["train"]["lora_kernels"]}
    parts = memory.estimate(row, catalog.model_presets()[cell["model"]].config)
    total = sum(parts.values()) / 1e9
    return {**{k: v / 1e9 for k, v in parts.items()}, "total_gb": total,
            "error": total / m.peak_mem_gb - 1 if m.peak_mem_gb else None}


def largest_fitting(model: str, peft: str, fast: bool, candidates: list[int], steps: int, warmup: int,
                    label: str) -> tuple[dict, list[dict]]:
    """The run at the first micro-batch (largest first) that does not run out of memory, and the
    runs that did."""
    tried = []
    for mb in candidates:
        r = run_trainer(bench_cell(model, peft, mb, fast, steps, warmup), f"{label} mb={mb}")
        if r["outcome"] == "ok":
            return r, tried
        tried.append(r)
    raise RuntimeError(f"{label}: no micro-batch of {candidates} fits: {tried[-1]['error']}")


def worker_hf_trainer(cell_dict: dict) -> dict:
    """Hugging Face Trainer + PEFT on the same model (bf16 base, fp32 adapters, autocast bf16),
    rows (packed, with their position ids), batch and optimizer (fused AdamW), timed with CUDA
    synchronised at each step's ends."""
    import torch

    from steps.plan.schema import CellSpec
    from steps.trainer import data, modeling

    cell = CellSpec.model_validate(cell_dict)
    tok = modeling.load_tokenizer(cell)
    splits = data.build_splits(cell.data, tok, cell.seq_len)
    rows = []
    for e in splits.train[: cell.micro_batch * cell.train.max_steps]:
        b = data.collate([e], tok.pad_id)
        rows.append({"input_ids": b["input_ids"][0], "labels": b["input_ids"][0].clone(),
                     "position_ids": b["position_ids"][0]})

    device = torch.device("cuda", 0)
    model = modeling.apply_peft(modeling.load_model(cell, tok.vocab_size, device), cell)
    torch.cuda.reset_peak_memory_stats()
    times = common.hf_trainer_step_times(model, rows, cell, cuda=True, bf16=True, optim="adamw_torch_fused",
                                         max_grad_norm=1.0)
    timed = times[cell.train.timing_warmup_steps:]
    tokens = cell.micro_batch * cell.seq_len
    return {"label": "HF Trainer + PEFT", "outcome": "ok", "micro_batch": cell.micro_batch,
            "tokens_per_s": tokens / statistics.mean(timed), "step_s": statistics.mean(timed),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}


def run_hf(cell: dict) -> dict:
    proc = common.run_worker(["--device", "cuda", "--worker", "hf_trainer", "--cell-json", json.dumps(cell)])
    if proc.returncode:
        return _saved({"label": "HF Trainer + PEFT", "outcome": "error", "micro_batch": cell["micro_batch"],
                       "error": proc.stderr[-3000:]})
    r = common.last_json(proc.stdout)
    r["mfu"] = None
    print(f"  HF Trainer + PEFT: tok/s={r['tokens_per_s']:,.0f} peak={r['peak_mem_gb']:.1f} GB", flush=True)
    return _saved(r)


def part_lora(steps: int, warmup: int, candidates: list[int]) -> dict:
    """The largest micro-batch with the fast paths; without them the largest that fits then
    (fused kernels and compiled layers keep less in memory); HF Trainer and the fast paths again
    at that micro-batch, so that every ratio compares equal settings."""
    model = "tinyllama-1.1b"
    fast, tried = largest_fitting(model, "lora", True, candidates, steps, warmup, "trainer, fast paths")
    plain, more = largest_fitting(model, "lora", False, [c for c in candidates if c <= fast["micro_batch"]],
                                  steps, warmup, "trainer, no fast paths")
    runs = [fast, plain]
    same = fast
    if plain["micro_batch"] != fast["micro_batch"]:
        same = run_trainer(bench_cell(model, "lora", plain["micro_batch"], True, steps, warmup),
                           f"trainer, fast paths mb={plain['micro_batch']}")
        runs.append(same)
    hf = run_hf(bench_cell(model, "lora", plain["micro_batch"], False, steps, warmup))
    if same.get("mfu") and hf.get("tokens_per_s"):
        hf["mfu"] = same["mfu"] * hf["tokens_per_s"] / same["tokens_per_s"]  # the same FLOPs per token
    runs.append(hf)
    return {"micro_batch": fast["micro_batch"], "runs": runs, "out_of_memory": tried + more,
            "ratios": {"fast_vs_hf": _ratio(same, hf), "fast_vs_plain": _ratio(same, plain),
                       "plain_vs_hf": _ratio(plain, hf), "best_fast_vs_hf": _ratio(fast, hf)}}


def part_lora_fixed(steps: int, warmup: int, large: int = 16, small: int = 8) -> dict:
    """`make gpu-evidence`'s LoRA part: no search, the kernels first. At `large` (what the fast
    paths fitted on an H100): the kernels with the other fast paths, then the fast paths alone;
    at `small` (what fitted without them): HF Trainer + PEFT, the kernels, no fast paths, the
    fast paths. Every run drawn on the GPU (seconds, not a minute of CPU)."""
    model, runs = "tinyllama-1.1b", {}

    def cell(mb, fast, kernels=False):
        return bench_cell(model, "lora", mb, fast, steps, warmup, init_device="device", kernels=kernels)

    runs["kernels"] = run_trainer(cell(large, True, kernels=True), f"fast paths + lora_kernels mb={large}")
    runs["fast"] = run_trainer(cell(large, True), f"fast paths mb={large}")
    runs["hf"] = run_hf(cell(small, False))
    runs["kernels_small"] = run_trainer(cell(small, True, kernels=True), f"fast paths + lora_kernels mb={small}")
    runs["plain"] = run_trainer(cell(small, False), f"no fast paths mb={small}")
    runs["fast_small"] = run_trainer(cell(small, True), f"fast paths mb={small}")
    hf = runs["hf"]
    if runs["fast_small"].get("mfu") and hf.get("tokens_per_s"):
        hf["mfu"] = runs["fast_small"]["mfu"] * hf["tokens_per_s"] / runs["fast_small"]["tokens_per_s"]
    return {"micro_batch": large, "runs": list(runs.values()),
            "ratios": {"kernels_vs_hf": _ratio(runs["kernels_small"], hf), "fast_vs_hf": _ratio(runs["fast_small"], hf),
                       "plain_vs_hf": _ratio(runs["plain"], hf),
                       "kernels_vs_fast": _ratio(runs["kernels"], runs["fast"]),
                       "best_kernels_vs_hf": _ratio(runs["kernels"], hf)}}


def part_qlora(steps: int, warmup: int, micro_batch: int, kernels: bool = False) -> dict:
    """QLoRA against LoRA at the 7B shape (and, `kernels`, QLoRA with `lora_kernels` after)."""
    # 7B random weights drawn on the GPU: seconds, where the CPU takes minutes per run.
    runs = [run_trainer(bench_cell("llama-2-7b", peft, micro_batch, True, steps, warmup, compile_layers=False,
                                   init_device="device"), f"7B {peft}") for peft in ("lora", "qlora")]
    if kernels:
        runs.append(run_trainer(bench_cell("llama-2-7b", "qlora", micro_batch, True, steps, warmup,
                                           init_device="device", kernels=True), "7B qlora + lora_kernels"))
    lora, qlora = runs[:2]
    ok = lora["outcome"] == qlora["outcome"] == "ok"
    return {"micro_batch": micro_batch, "runs": runs,
            "ratios": {"qlora_peak_vs_lora": qlora["peak_mem_gb"] / lora["peak_mem_gb"] if ok else None,
                       "qlora_tokens_vs_lora": _ratio(qlora, lora),
                       **({"qlora_kernels_peak_vs_lora": runs[2]["peak_mem_gb"] / lora["peak_mem_gb"]
                           if ok and runs[2]["outcome"] == "ok" else None,
                           "qlora_kernels_tokens_vs_lora": _ratio(runs[2], lora)} if kernels else {})}}


def _ratio(a: dict, b: dict) -> float | None:
    return a["tokens_per_s"] / b["tokens_per_s"] if a.get("tokens_per_s") and b.get("tokens_per_s") else None


def print_tables(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=170)
    for part, result in record["parts"].items():
        table = Table(title=f"{part}: sequence {SEQ}, bf16-mixed, {record['device']}")
        for col in ("run", "outcome", "micro-batch", "tokens/s", "MFU", "peak alloc GB", "reserved GB", "GPU util %",
                    "estimate GB", "estimate error"):
            table.add_column(col, justify="left" if col in ("run", "outcome") else "right")
        for r in result["runs"]:
            est = r.get("estimate") or {}
            table.add_row(r["label"], r["outcome"], str(r.get("micro_batch", "-")),
                          f"{r.get('tokens_per_s') or 0:,.0f}",
                          f"{r['mfu']:.3f}" if r.get("mfu") else "-", f"{r.get('peak_mem_gb') or 0:.2f}",
                          f"{r.get('peak_reserved_gb') or 0:.2f}",
                          f"{r['gpu_util_pct']:.0f}" if r.get("gpu_util_pct") is not None else "-",
                          f"{est['total_gb']:.2f}" if est else "-",
                          f"{est['error']:+.1%}" if est.get("error") is not None else "-")
        console.print(table)
        console.print("  " + ", ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items() if v is not None))


def main(args) -> int:
    if args.worker == "hf_trainer":
        print(json.dumps(worker_hf_trainer(json.loads(args.cell_json))))
        return 0
    record = {"bench": "gpu", **common.environment(), "parts": {}}
    fixed = args.runs == "fixed"

    def part(name: str, work) -> None:
        """One part, its runs kept in `--json` as each finishes."""
        global _SAVE
        done: list = []
        record["parts"][name] = {"runs": done, "ratios": {}, "finished": False}

        def save(run: dict) -> None:
            done.append(run)
            _write(record, args.json)

        _SAVE = save
        record["parts"][name] = {**work(), "finished": True}
        _SAVE = None
        _write(record, args.json)

    if args.part in ("lora", "all"):
        print("LoRA, TinyLlama-1.1B shape", flush=True)
        sizes = [int(x) for x in args.micro_batches.split(",")]
        part("lora-1.1b", (lambda: part_lora_fixed(args.steps, args.warmup)) if fixed
             else (lambda: part_lora(args.steps, args.warmup, sizes)))
    if args.part in ("qlora", "all"):
        print("QLoRA vs LoRA, Llama-2-7B shape", flush=True)
        part("qlora-7b", lambda: part_qlora(args.steps, args.warmup, args.qlora_micro_batch, kernels=fixed))
    print_tables(record)
    _write(record, args.json)
    if args.save:
        gpu = record["device"].replace("NVIDIA ", "").split()[0].lower()
        common.save(record, f"bench-gpu-{args.part}-{gpu}")
    return 0


def _write(record: dict, path: str | None) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2, default=str))


# What the GPU runs import beyond this checkout's own modules: needed on the GPU machine,
# absent on a CPU one (liger_kernel needs Triton).
GPU_ONLY_MODULES = ("liger_kernel",)


def fixed_cells(args) -> list[dict]:
    """Every cell `--runs fixed` would launch, for `check`."""
    cells = [bench_cell("tinyllama-1.1b", "lora", mb, fast, args.steps, args.warmup, init_device="device",
                        kernels=kernels)
             for mb, fast, kernels in ((16, True, True), (16, True, False), (8, True, True), (8, False, False),
                                       (8, True, False))]
    cells += [bench_cell("llama-2-7b", peft, args.qlora_micro_batch, True, args.steps, args.warmup,
                         compile_layers=False, init_device="device", kernels=kernels)
              for peft, kernels in (("lora", False), ("qlora", False), ("qlora", True))]
    return cells


def check(args) -> int:
    """`--check`: every cell the runs would launch is valid and not refused, and the modules the
    runs import are there (GPU-only ones are listed, not required, on a machine without CUDA)."""
    import importlib
    import importlib.util

    from steps.plan import compat
    from steps.plan.schema import CellSpec

    problems = []
    for cell in fixed_cells(args):
        spec = CellSpec.model_validate(cell)
        if reason := compat.refusal(spec):
            problems.append(f"{cell['cell_id']}: refused: {reason}")
    for module in ("steps.train", "steps.trainer.lora_kernels", "steps.trainer.engines", "transformers",
                   "peft", "bitsandbytes", "accelerate"):
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - each missing import is one problem
            problems.append(f"import {module}: {type(exc).__name__}: {exc}")
    missing = [m for m in GPU_ONLY_MODULES if importlib.util.find_spec(m) is None]
    print(json.dumps({"cells": len(fixed_cells(args)), "problems": problems, "gpu_only_missing_here": missing}))
    return 1 if problems else 0
