"""A cell as a Slurm job, from the flow's train step on the machine that runs the flow (a login
node): write the cell and its batch script into the cell's folder (on the filesystem the nodes
share), `sbatch` it, follow it with `scontrol` (`sacct` once the controller has forgotten it),
echo the trainer's log as it grows, and read the result the nodes wrote. A step stopped by
Ctrl-C or SIGTERM cancels its job (`scancel`) on the way out.

Why not Metaflow's @slurm extension or submitit: the first submits over SSH only and has no GPU
(gres) option; the second pickles a Python call and needs Slurm's accounting to follow a job.
A batch script the user can read (and submit by hand) and four client commands work on any
cluster the user can log in to."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from steps.flow import launcher
from steps.flow.jobs import stop_job_on_exit
from steps.flow.slurm.outcome import TERMINAL, job_result, parse_record, state_of, summary
from steps.flow.slurm.script import job_script, slurm_time, time_limit_s
from steps.plan.schema import CellSpec
from steps.results.metrics import PARTIAL_CURVES, CellMetrics

COMMAND_TIMEOUT_S = 60.0  # a controller that does not answer within this is an error, not a wait
FORGOTTEN_POLLS = 3  # polls that find the job nowhere before the step gives up on it
CANCEL_WAIT_S = 4.0  # Metaflow gives a stopped task 5 s before it kills it
SACCT_FIELDS = {"JobID": "JobId", "JobName": "JobName", "State": "JobState", "ExitCode": "ExitCode",
                "NodeList": "NodeList", "Submit": "SubmitTime", "Start": "StartTime", "End": "EndTime",
                "Timelimit": "TimeLimit", "Reason": "Reason"}


class SlurmError(RuntimeError):
    """A Slurm command failed (its message says why: a bad partition, no controller)."""


def _print(*parts: Any) -> None:
    print(*parts, flush=True)


def _run(cmd: list[str], timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"`{' '.join(cmd)}` did not answer within {timeout:g} s (is slurmctld reachable?)") from exc


def submit(script: Path) -> str:
    """sbatch the script; the job id."""
    proc = _run(["sbatch", "--parsable", str(script)])
    if proc.returncode != 0 or not proc.stdout.strip():
        raise SlurmError((proc.stderr or proc.stdout).strip() or f"sbatch exited with {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1].split(";")[0]  # "ID" or "ID;cluster"


def describe(job_id: str) -> dict[str, str] | None:
    """The job's record: the controller's while it remembers the job (MinJobAge), then the
    accounting's where the cluster keeps one; None where neither knows it."""
    proc = _run(["scontrol", "show", "job", "-o", job_id])
    if proc.returncode == 0 and "JobId=" in proc.stdout:
        return parse_record(proc.stdout.strip().splitlines()[0])
    proc = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", ",".join(SACCT_FIELDS)])
    line = proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""
    if not line:
        return None
    return {SACCT_FIELDS[k]: v for k, v in zip(SACCT_FIELDS, line.split("|"), strict=False)}


def cancel(job_id: str, echo=_print) -> None:
    """scancel, then a short wait for the job to leave the queue (its nodes get SIGTERM, then
    SIGKILL after the cluster's KillWait)."""
    proc = _run(["scancel", job_id])
    echo(f"slurm {job_id}: cancelled (the step ended before the job)"
         + (f": {proc.stderr.strip()}" if proc.returncode else ""))
    deadline = time.monotonic() + CANCEL_WAIT_S
    while time.monotonic() < deadline:
        record = describe(job_id)
        if record is None or state_of(record) in TERMINAL:
            return
        time.sleep(0.2)


class LogTail:
    """The trainer's log (node 0's train.log in the shared cell folder) into the step's output
    as it grows: the step's log in the Metaflow UI follows the cell as a local cell's does."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def echo(self, echo=_print) -> None:
        with contextlib.suppress(FileNotFoundError), open(self.path, encoding="utf-8", errors="replace") as fh:
            fh.seek(self.offset)
            text = fh.read()
            cut = text.rfind("\n") + 1  # whole lines only; the rest next time
            if cut:
                echo(text[:cut].rstrip("\n"))
                self.offset += len(text[:cut].encode("utf-8"))


def follow(job_id: str, out_dir: Path, poll_s: float, echo=_print) -> dict[str, str]:
    """Poll the job until it ends; its last record."""
    tail, said, missing = LogTail(Path(out_dir) / "train.log"), None, 0
    while True:
        record = describe(job_id)
        if record is None:
            missing += 1
            if missing >= FORGOTTEN_POLLS:
                return {"JobId": job_id, "JobState": "UNKNOWN",
                        "Reason": "neither scontrol nor sacct knows the job any more"}
        else:
            missing = 0
            line = summary(record)
            if line != said:
                echo(f"slurm {job_id}: {line}")
                said = line
            tail.echo(echo)
            if state_of(record) in TERMINAL:
                return record
        time.sleep(poll_s)


def _clear_previous(out_dir: Path) -> None:
    """What an earlier attempt left that could be read as this one's (checkpoints stay: a retry
    resumes from them)."""
    for folder in [out_dir, *out_dir.glob("node[0-9]*")]:
        (folder / "metrics.json").unlink(missing_ok=True)
        (folder / PARTIAL_CURVES).unlink(missing_ok=True)


def cost_usd(cell: CellSpec, remote: dict[str, Any], seconds: float | None) -> float | None:
    """The cluster's own rate for each of the cell's devices; None without one."""
    rate = remote.get("price_per_gpu_hour")
    return seconds / 3600 * rate * cell.world_size if rate and seconds is not None else None


def run_cell(cell: CellSpec, out_dir: Path, remote: dict[str, Any], echo=_print) -> tuple[CellMetrics, str]:
    """One attempt of a cell as a Slurm job; its metrics and its log, with the cell folder as a
    local cell's (metrics.json, train.log, adapter/, node<i>/) plus job.sbatch and slurm-<id>.out."""
    out_dir = Path(out_dir)
    launcher.write_cell(cell, out_dir)
    _clear_previous(out_dir)
    script = out_dir / "job.sbatch"
    script.write_text(job_script(cell, remote, out_dir))
    holder: dict[str, str] = {}
    # SIGKILL cannot be cancelled: the job's --time bounds it, and `squeue --name fm-<cell id>` finds it
    with stop_job_on_exit(holder, "id", lambda job: cancel(job, echo)):
        try:
            job_id = submit(script)
        except (SlurmError, FileNotFoundError) as exc:
            m = CellMetrics(cell_id=cell.cell_id, outcome="error", world_size=cell.world_size,
                            global_batch=cell.global_batch, out_dir=str(out_dir),
                            error=f"Slurm did not take the job ({script}): {exc}"[:2000])
            m.write(out_dir / "metrics.json")
            return m, str(exc)
        holder["id"] = job_id
        echo(f"slurm: {cell.cell_id} is job {job_id} ({cell.nodes} node(s) x {cell.gpus}); script {script}")
        record = follow(job_id, out_dir, float(remote.get("poll_s", 15)), echo)
        holder.clear()
    m, log = job_result(cell, record, out_dir, limit=slurm_time(time_limit_s(cell, remote)))
    m.update(cost_usd=cost_usd(cell, remote, m.wall_s), out_dir=str(out_dir))
    m.write(out_dir / "metrics.json")
    return m, log


def missing_client() -> str | None:
    """Why this machine cannot submit (checked in `start`); None where it can."""
    absent = [c for c in ("sbatch", "scontrol", "scancel") if shutil.which(c) is None]
    if absent:
        return (f"compute: slurm submits each cell with Slurm's client commands, and {', '.join(absent)} "
                f"{'is' if len(absent) == 1 else 'are'} not on this machine's PATH: run the flow on a login node "
                "of the cluster")
    return None
