"""Where a run's refusal is printed: last, after Metaflow's own lines about the failed `start`.
Light on purpose: the flow file enters it in every process it starts, card processes included."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path

PROBLEMS_FILE = "FINETUNE_MATRIX_PROBLEMS_FILE"  # where `start` leaves its problems for the runtime


@contextlib.contextmanager
def problems_last(argv: list[str]):
    """Around the flow's command line: a `run` or `resume` whose `start` found problems ends
    with them, after Metaflow's own lines about the failed step."""
    if "step" in argv or not {"run", "resume"} & set(argv):
        yield
        return
    fd, path = tempfile.mkstemp(prefix="finetune-matrix-problems-")
    os.close(fd)
    os.environ[PROBLEMS_FILE] = path
    try:
        yield
    finally:
        text = Path(path).read_text()
        Path(path).unlink(missing_ok=True)
        if text.strip():
            print(f"\nThe matrix cannot run; start found, before any cell ran:\n{text.rstrip()}",
                  file=sys.stderr, flush=True)
