"""What the launcher watching a cell sees of each rank while it runs: a heartbeat file (its
progress, and the process id to send a stack-dump signal to), rank 0's curve so far, and log
lines prefixed with the rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TextIO

from steps.results import metrics
from steps.results.metrics import TRAINING
from steps.trainer.progress import Progress


class Heartbeat:
    """Shows the launcher that this rank makes progress, for hang detection.

    Every rank has its own file, `<out>/heartbeat/rank<N>`, holding its process id (the launcher
    signals exactly the trainer processes) from start-up on, and touched at each beat: a stuck
    rank and the ranks waiting for it in a collective all go quiet. The first beat (training
    starts) adds the line "training": start-up (imports, rendezvous, model loading) takes as
    long as the model needs and is bounded by the cell's timeout only. Rank 0 also appends each
    new curve point to `partial.jsonl`, so a cell stopped as `hang` or `timeout` keeps what it
    measured.
    """

    def __init__(self, out: Path, rank: int):
        folder = out / metrics.HEARTBEAT_DIR
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"rank{rank}"
        self.path.write_text(f"{os.getpid()}\n")
        self.training = False
        self.partial = out / metrics.PARTIAL_CURVES if rank == 0 else None
        self.written = {"loss_curve": 0, "val_curve": 0}  # points already in `partial`

    def beat(self, progress: Progress | None = None) -> None:
        if self.training:
            self.path.touch()
        else:
            self.path.write_text(f"{os.getpid()}\n{TRAINING}\n")
            self.training = True
        if self.partial is None or progress is None:
            return
        lines = []
        for kind, points in (("loss_curve", progress.loss_curve), ("val_curve", progress.val_curve)):
            lines += [json.dumps({"curve": kind, **p.model_dump()}) + "\n" for p in points[self.written[kind]:]]
            self.written[kind] = len(points)
        if lines:
            with open(self.partial, "a", encoding="utf-8") as fh:
                fh.writelines(lines)


class RankPrefix:
    """Prefix each line written with the rank, as torchrun's `--tee` does ("[default0]:"), for
    launchers that do not (DeepSpeed's)."""

    def __init__(self, stream: TextIO, rank: int):
        self.stream, self.prefix, self.at_line_start = stream, metrics.rank_prefix(rank), True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append(self.prefix + piece if self.at_line_start else piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)
