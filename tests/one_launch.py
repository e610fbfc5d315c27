"""Several cells of one world size trained by one torchrun launch, one after the other, each
by the trainer's own `main` (its own metrics and output folder): the tests' way to pay torch's
and transformers' start-up once per launch instead of once per cell.

    torchrun --nproc_per_node N -m tests.one_launch CELL.yaml OUT [CELL.yaml OUT ...]

The process group stays up between cells (groups are not rebuilt on a destroyed world), and
peak memory is a per-process figure, so a later cell's peak includes earlier ones.
"""

from __future__ import annotations

import os
import sys

import yaml

from steps.trainer.main import main


def _needs_bitsandbytes(cell_file: str) -> bool:
    with open(cell_file, encoding="utf-8") as fh:
        cell = yaml.safe_load(fh)
    return cell["peft"] == "qlora" or cell.get("train", {}).get("optimizer") == "paged_adamw_8bit"


if __name__ == "__main__":
    args = sys.argv[1:]
    # A cell without 4-bit weights hides bitsandbytes from the process: the ones that need it first.
    pairs = sorted(zip(args[::2], args[1::2]), key=lambda pair: not _needs_bitsandbytes(pair[0]))
    codes = [main(["--cell", cell, "--out", out], end_process_group=i == len(pairs) - 1)
             for i, (cell, out) in enumerate(pairs)]
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(max(codes))
