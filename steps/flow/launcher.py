"""Launch one cell's trainer under torchrun, watch it, and collect its metrics.

Each launch gets its own free port, output folder and share of CPU threads, so cells can run
side by side (`--max-workers`). A refused, timed-out or hung cell is a result, not an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import yaml

from steps import REPO_ROOT
from steps.flow import cpu_slots
from steps.plan import catalog
from steps.plan.credentials import redact
from steps.plan.schema import CellSpec
from steps.results.metrics import (
    HEARTBEAT_DIR,
    LAUNCHER_PID_ENV,
    PARTIAL_CURVES,
    TRAINING,
    CellMetrics,
    LossPoint,
    ValPoint,
    rank_prefix,
)

KILL_GRACE_S = 5.0
CPU_MALLOC_ENV = catalog.CPU_MALLOC_ENV  # see there: the probe runs with it too
STACK_DUMP_WAIT_S = 2.0
POLL_S = 0.25


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_command(cell: CellSpec, cell_file: Path, out_dir: Path, port: int,
                    node_rank: int = 0, master_addr: str = "127.0.0.1", resume: bool = False) -> list[str]:
    """torchrun (or DeepSpeed's launcher) for several processes; one process runs the trainer
    directly (a launcher would only add its own start-up, about 1.7 s here) with the
    environment torchrun would give it. `resume`: continue from the last checkpoint in
    `out_dir` where there is one."""
    trainer = ["--cell", str(cell_file), "--out", str(out_dir), *(["--resume"] if resume else [])]
    if cell.world_size == 1:
        return [sys.executable, "-m", "steps.train", *trainer]
    if cell.train.launcher == "deepspeed":
        multinode = ["--no_ssh", "--node_rank", str(node_rank)] if cell.nodes > 1 else []
        return [
            sys.executable, "-m", "deepspeed.launcher.runner",
            "--num_nodes", str(cell.nodes), "--num_gpus", str(cell.gpus), *multinode,
            "--master_addr", master_addr, "--master_port", str(port),
            "--module", "steps.train", *trainer,
        ]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(cell.nodes),
        "--node-rank", str(node_rank),
        "--nproc-per-node", str(cell.gpus),
        "--master-addr", master_addr,
        "--master-port", str(port),
        "--tee", "3",  # prefixes every line with its rank: "[default0]:..."
        "-m", "steps.train", *trainer,
    ]


def _pump(stream: TextIO, log: TextIO, echo: bool, prefix: str) -> None:
    """The trainer's lines (its libraries' included) into the log and the terminal, a URI's
    credentials redacted."""
    for line in stream:
        line = redact(prefix + line)
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


def skipped_metrics(cell: CellSpec, reason: str) -> CellMetrics:
    return CellMetrics(cell_id=cell.cell_id, outcome="skipped", error=reason, wall_s=0.0,
                       world_size=cell.world_size, global_batch=cell.global_batch)


def last_progress(out_dir: Path, since: float) -> float | None:
    """When a training rank of this node last showed progress; None before any rank trains
    (start-up, however long the model takes to load, is bounded by the timeout only)."""
    stamps = []
    for beat in (out_dir / HEARTBEAT_DIR).glob("rank*"):
        with contextlib.suppress(OSError):
            if TRAINING in beat.read_text().split():
                stamps.append(beat.stat().st_mtime)
    stamps = [t for t in stamps if t >= since]
    return max(stamps) if stamps else None


def run_cell(cell: CellSpec, out_dir: Path, echo: bool = True, node_rank: int = 0,
             master_addr: str = "127.0.0.1", port: int | None = None, resume: bool = False,
             keep_devices: bool = False) -> CellMetrics:
    """Run this node's part of a cell to completion, time limit or hang; return its metrics.

    `wall_s` is launch to exit as seen from here (process start-up included). Node 0 holds
    global rank 0, which writes the cell's metrics; other nodes report their exit only.
    `keep_devices`: the cell's cores or GPUs stay held until this process exits (a flow task).
    """
    out_dir = Path(out_dir)
    cell_file = write_cell(cell, out_dir)
    (out_dir / "metrics.json").unlink(missing_ok=True)
    _clear_working_files(out_dir)  # a previous attempt's
    port = port or free_port()
    cmd = trainer_command(cell, cell_file, out_dir, port, node_rank, master_addr, resume)
    stopped = None  # "timeout" or "hang"
    queued = time.perf_counter()
    with _devices(cell, keep_devices) as (cores, gpus), open(out_dir / "train.log", "w", encoding="utf-8") as log:
        env = _environment(cell, cores, port, gpus)
        log.write(f"$ {' '.join(cmd)}\n# node {node_rank}, port {port}, cores {cores}, "
                  f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, nice {os.getpriority(os.PRIO_PROCESS, 0)}"
                  + (f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}" if gpus else "") + "\n")
        log.flush()
        start, started_at = time.perf_counter(), time.time()
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
        prefix = rank_prefix(0) if cell.world_size == 1 else ""
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, echo, prefix), daemon=True)
        pump.start()
        stopped = _watch(proc, cell, out_dir, start, started_at)
        pump.join(timeout=KILL_GRACE_S)
    wall = time.perf_counter() - start
    m = _result(cell, out_dir, proc.returncode, stopped, node_rank)
    _clear_working_files(out_dir)  # what they held is in the metrics now
    m.update(wall_s=wall, queued_s=start - queued, exit_code=proc.returncode, cores=cores,
             started_at=started_at, ended_at=started_at + wall, node_rank=node_rank,
             out_dir=str(out_dir))
    if m.train_s is not None:
        # Everything that is not training or evaluation: start-up, imports, model build, saving.
        m.overhead_s = wall - m.train_s - (m.eval_s or 0.0)
    m.write(out_dir / "metrics.json")
    return m


def _clear_working_files(out_dir: Path) -> None:
    shutil.rmtree(out_dir / HEARTBEAT_DIR, ignore_errors=True)
    (out_dir / PARTIAL_CURVES).unlink(missing_ok=True)


def _watch(proc: subprocess.Popen, cell: CellSpec, out_dir: Path, start: float,
           started_at: float) -> str | None:
    """Wait for the trainer; stop it at the time limit or when no rank has progressed for
    `hang_after_s` once training has started (its stacks dumped into the log first). Returns
    why it was stopped."""
    hang_after = cell.train.hang_after_s
    while True:
        try:  # back the moment it exits: wall_s ends there, not at the next poll
            proc.wait(timeout=POLL_S)
            return None
        except subprocess.TimeoutExpired:
            pass
        if time.perf_counter() - start > cell.train.timeout_s:
            _stop(proc)
            return "timeout"
        progress = last_progress(out_dir, started_at) if hang_after else None
        if progress is not None and time.time() - progress > hang_after:
            dump_stacks(out_dir)
            _stop(proc)
            return "hang"


def _result(cell: CellSpec, out_dir: Path, code: int | None, stopped: str | None,
            node_rank: int) -> CellMetrics:
    try:
        m = CellMetrics.read(out_dir / "metrics.json")
    except ValueError as exc:  # written, but not what the contract says
        m = CellMetrics(cell_id=cell.cell_id, outcome="error", error=str(exc)[:2000])
    if m is None and node_rank > 0 and code == 0 and not stopped:
        return CellMetrics(cell_id=cell.cell_id, outcome="ok")  # node 0 reports the cell
    m = m or CellMetrics(cell_id=cell.cell_id, outcome="error",
                         error=f"trainer exited with code {code} and wrote no metrics (see {out_dir / 'train.log'})")
    if stopped:
        loss_curve, val_curve = read_partial(out_dir / PARTIAL_CURVES)
        if len(loss_curve) > len(m.loss_curve):
            m.update(loss_curve=loss_curve, val_curve=val_curve)
        steps_done = len(m.loss_curve)
        if stopped == "timeout":
            why = f"no result within timeout_s={cell.train.timeout_s:g} ({steps_done} steps done)"
        else:
            why = (f"no progress for hang_after_s={cell.train.hang_after_s:g} after {steps_done} "
                   f"steps; all ranks stopped, their Python stacks are in the log")
        m.update(outcome=stopped, error=why, stopped_after_steps=steps_done)
    return m


def read_partial(path: Path) -> tuple[list[LossPoint], list[ValPoint]]:
    """The curves rank 0 appended step by step (a torn last line is skipped)."""
    kinds = {"loss_curve": LossPoint, "val_curve": ValPoint}
    out: dict[str, list] = {kind: [] for kind in kinds}
    with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
        for line in fh:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                point = json.loads(line)
                kind = point.pop("curve")
                out[kind].append(kinds[kind].model_validate(point))
    return out["loss_curve"], out["val_curve"]


def trainer_pids(out_dir: Path) -> list[int]:
    """The trainer processes of this node: each rank writes its pid into its heartbeat file."""
    pids = []
    for beat in (out_dir / HEARTBEAT_DIR).glob("rank*"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(beat.read_text().split()[0]))
    return pids


def dump_stacks(out_dir: Path) -> None:
    """SIGUSR1 to every trainer process (faulthandler prints all their threads' stacks).

    Not to torchrun or DeepSpeed's launcher: SIGUSR1 would end them before their ranks' output
    is copied.
    """
    for pid in trainer_pids(out_dir):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(STACK_DUMP_WAIT_S)


@contextlib.contextmanager
def _devices(cell: CellSpec, keep: bool = False):
    """(cores, GPUs) this cell holds while it runs: local CPU cells their cores, `local-gpu`
    cells their GPUs; elsewhere each task owns its machine ([], [])."""
    instance = catalog.instances().get(cell.instance)
    if instance is not None and instance.local:
        with cpu_slots.reserve(cell.gpus, instance.cores_per_device, keep=keep) as cores:  # this node's processes
            yield cores, []
    elif instance is not None and instance.local_gpu:
        with cpu_slots.reserve_gpus(cell.gpus, instance.devices_per_node, keep=keep) as gpus:
            yield [], gpus
    else:
        yield [], []


def _environment(cell: CellSpec, cores: list[int], port: int, gpus: list[int] | None = None) -> dict[str, str]:
    threads = max(1, len(cores) // cell.gpus) if cores else max(1, (os.cpu_count() or 1) // cell.gpus)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    instance = catalog.instances().get(cell.instance)
    if instance is not None and instance.local:
        env = {**CPU_MALLOC_ENV, **env}  # the user's own setting wins
    if cell.world_size == 1:  # what torchrun would set for its one process
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if cell.world_size > 1 and cell.train.launcher == "deepspeed":
        env["FINETUNE_MATRIX_RANK_PREFIX"] = "1"  # DeepSpeed's launcher does not prefix lines
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the cell's processes: the tree of the one started here
    return env


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the whole process group (torchrun and its ranks), SIGKILL what is left after a
    grace period (a rank stuck in a collective may not act on SIGTERM, even once torchrun is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + KILL_GRACE_S
    while time.monotonic() < deadline and (proc.poll() is None or _group_alive(proc.pid)):
        time.sleep(POLL_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
