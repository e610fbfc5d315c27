"""The four parts of `make gpu-evidence`, in the order they run, each with its time limit.

The limits add up to 9 minutes on an H100 (measured runs: docs/evidence.md); the
order puts first what no other part can give: the GPU tests, then LoRA at the 1.1B shape (the
kernels' runs first), QLoRA against LoRA at 7B, and a matrix through the flow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
FLOW_MATRIX = REPO / "configs" / "matrix" / "gpu-evidence.yaml"

# The GPU tests that matter most (tests/test_gpu.py's cells; FINETUNE_MATRIX_GPU_CELLS): every
# method's memory layout under bf16-mixed, the fp32 curve against the CPU's, the LoRA kernels
# (QLoRA's too, and after Liger) against PEFT, Liger, QLoRA drawn on the GPU, a real CUDA
# out-of-memory. Left for `make test-gpu`: the other precisions, FSDP/ZeRO-3 on one GPU,
# inductor's compile, packing, the 1.1B shape with three methods.
GPU_TEST_CELLS = ("full-fp32", "lora-fp32", "full-bf16-mixed", "lora-bf16-mixed", "dora-bf16-mixed",
                  "qlora-bf16-mixed", "lora-liger", "qlora-drawn-on-gpu", "lora-all-linear", "qlora-all-linear",
                  "lora-kernels", "qlora-kernels", "lora-kernels-liger", "oom")
BENCH_STEPS = ("--steps", "12", "--warmup", "3")


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    limit_s: int
    command: tuple[str, ...]  # after the interpreter; {out} is the part's output folder
    output: str  # the part's file in the output folder
    check: tuple[str, ...]  # the dry run's command: parses and imports, runs nothing
    env: tuple[tuple[str, str], ...] = ()

    def argv(self, python: str, out: Path, dry: bool = False) -> list[str]:
        return [python, *(a.format(out=out) for a in (self.check if dry else self.command))]


PARTS = (
    Part("tests", 110,
         ("-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-k", "not tinyllama", "-q", "-p", "no:cacheprovider",
          "--junitxml", "{out}/tests.xml"),
         "tests.json",
         ("-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-k", "not tinyllama", "-q", "-p", "no:cacheprovider",
          "--collect-only"),
         (("FINETUNE_MATRIX_GPU_CELLS", ",".join(GPU_TEST_CELLS)),)),
    Part("lora-1.1b", 170,
         ("-m", "steps.bench", "--device", "cuda", "--part", "lora", "--runs", "fixed", *BENCH_STEPS,
          "--json", "{out}/lora-1.1b.json"),
         "lora-1.1b.json",
         ("-m", "steps.bench", "--device", "cuda", "--part", "lora", "--runs", "fixed", *BENCH_STEPS, "--check")),
    Part("qlora-vs-lora-7b", 110,
         ("-m", "steps.bench", "--device", "cuda", "--part", "qlora", "--runs", "fixed", *BENCH_STEPS,
          "--json", "{out}/qlora-vs-lora-7b.json"),
         "qlora-vs-lora-7b.json",
         ("-m", "steps.bench", "--device", "cuda", "--part", "qlora", "--runs", "fixed", *BENCH_STEPS, "--check")),
    Part("flow", 150,
         ("flows/finetune_matrix.py", "--config", "matrix", str(FLOW_MATRIX), "run", "--max-workers", "1"),
         "flow.json",
         ("-m", "steps.report.evidence.flow_scores", "--check", str(FLOW_MATRIX)),
         (("FINETUNE_MATRIX_REPORTS", "{out}/flow-runs"),)),
)
BUDGET_S = sum(p.limit_s for p in PARTS)  # 540 s: 9 minutes
