"""`python -m steps.bench [--device cuda]`: the command line of both benches."""

from __future__ import annotations

import argparse
import os
import sys

from steps.trainer.bench import cpu, gpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=cpu.__doc__.splitlines()[0])
    for key, value in cpu.DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each, interleaved; tokens/s over the median step of all of them")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--save", action="store_true",
                        help="keep the results (device, versions, date) in reports/benchmarks/")
    parser.add_argument("--worker", choices=["minimal", "hf_trainer"], help=argparse.SUPPRESS)
    parser.add_argument("--cell-json", help=argparse.SUPPRESS)
    group = parser.add_argument_group("--device cuda: the GPU bench at real shapes (steps/trainer/bench/gpu.py)")
    group.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    group.add_argument("--part", choices=["lora", "qlora", "all"], default="all",
                       help="lora: 1.1B shape, fast paths vs none vs HF Trainer; qlora: QLoRA vs LoRA at the 7B shape")
    group.add_argument("--micro-batches", default="16,8,4,2,1", help="micro-batches to try, largest first")
    group.add_argument("--qlora-micro-batch", type=int, default=2)
    group.add_argument("--runs", choices=["search", "fixed"], default="search",
                       help="search: the largest micro-batch that fits; fixed: make gpu-evidence's runs")
    group.add_argument("--check", action="store_true",
                       help="parse the arguments and import what the runs use, run nothing (make gpu-evidence DRY=1)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if "--steps" not in (sys.argv if argv is None else argv):
            args.steps, args.warmup = 20, 5
        if args.check:
            return gpu.check(args)
        return gpu.main(args)
    if args.worker:
        return cpu.worker(args.worker, args.cell_json)
    return cpu.main(args)
