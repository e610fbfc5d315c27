"""Launch one cell's trainer under torchrun, watch it, and collect its metrics.

Each launch gets its own free port, output folder and share of CPU threads, so cells can run
side by side (`--max-workers`). A refused or timed-out cell is a result, not an exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import yaml

from steps import REPO_ROOT, cpu_slots
from steps.metrics import read_metrics, write_json_atomic
from steps.schema import CellSpec

KILL_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cell: CellSpec, cell_file: Path, out_dir: Path, port: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc-per-node", str(cell.gpus),
        "--master-addr", "127.0.0.1",
        "--master-port", str(port),
        "--tee", "3",  # prefixes every line with its rank: "[default0]:..."
        "-m", "steps.train", "--cell", str(cell_file), "--out", str(out_dir),
    ]


def _pump(stream: TextIO, log: TextIO, echo: bool) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()


def write_cell(cell: CellSpec, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "cell.yaml"
    path.write_text(yaml.safe_dump(cell.model_dump(mode="json"), sort_keys=False))
    return path


def skipped_metrics(cell: CellSpec, reason: str) -> dict[str, Any]:
    return {"cell_id": cell.cell_id, "outcome": "skipped", "error": reason, "wall_s": 0.0,
            "world_size": cell.world_size, "global_batch": cell.global_batch}


def run_cell(cell: CellSpec, out_dir: Path, echo: bool = True) -> dict[str, Any]:
    """Run the trainer to completion or to the cell's time limit; return its metrics.

    `wall_s` is launch to exit as seen from here (process start-up included).
    """
    out_dir = Path(out_dir)
    cell_file = write_cell(cell, out_dir)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    cmd = torchrun_command(cell, cell_file, out_dir, free_port())
    timed_out = False
    queued = time.perf_counter()
    with _devices(cell) as cores, open(out_dir / "train.log", "w", encoding="utf-8") as log:
        env = _environment(cell, cores)
        log.write(f"$ {' '.join(cmd)}\n# cores {cores}, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}\n")
        start, started_at = time.perf_counter(), time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo), daemon=True)
        pump.start()
        try:
            proc.wait(timeout=cell.train.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        pump.join(timeout=KILL_GRACE_S)
    wall = time.perf_counter() - start

    m = read_metrics(out_dir / "metrics.json") or {
        "cell_id": cell.cell_id, "outcome": "error",
        "error": f"trainer exited with code {proc.returncode} and wrote no metrics "
                 f"(see {out_dir / 'train.log'})",
    }
    if timed_out:
        m.update(outcome="timeout", error=f"no result within timeout_s={cell.train.timeout_s:g}")
    m.update(wall_s=wall, queued_s=start - queued, exit_code=proc.returncode, cores=cores,
             started_at=started_at, ended_at=started_at + wall)
    write_json_atomic(out_dir / "metrics.json", m)
    return m


def _devices(cell: CellSpec):
    """Local CPU cells hold their cores while they run; elsewhere each task owns its machine."""
    if cell.instance == "local-cpu":
        return cpu_slots.reserve(cell.world_size)
    return contextlib.nullcontext([])


def _environment(cell: CellSpec, cores: list[int]) -> dict[str, str]:
    threads = max(1, len(cores) // cell.gpus) if cores else max(1, (os.cpu_count() or 1) // cell.gpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (torchrun and its ranks), SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
