"""What a Slurm job's end means for its cell: the same outcomes as a local cell.

- the trainer's own outcome (ok, oom, diverged, error, timeout, hang) from the metrics.json the
  nodes wrote in the shared cell folder: an ended cell (ok, oom, diverged) stays so whatever came
  to its job afterwards (a cancel or the time limit during teardown);
- TIMEOUT (the job's --time) and DEADLINE: `timeout`, with the curve trained so far;
- OUT_OF_MEMORY (the node's cgroup killed it): `oom`;
- NODE_FAIL, PREEMPTED, BOOT_FAIL: `error` with the reason, which the flow retries per `retries`
  (from the cell's last checkpoint where `checkpoint_every` is set);
- CANCELLED by someone on the cluster (scancel): `stopped`, a result the flow does not retry;
- a job that could not see its cell folder (exit code 97): `error`, saying what to share.
Pure: the job's record (`scontrol show job -o`, or `sacct`) and the cell folder in, CellMetrics out.
"""

from __future__ import annotations

import contextlib
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from steps.flow.launcher import read_partial
from steps.flow.slurm.script import NOT_SHARED
from steps.plan.schema import CellSpec
from steps.results.metrics import PARTIAL_CURVES, CellMetrics
from steps.results.nodes import gather, read_nodes

TERMINAL = ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED")
RETRIED = ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL")  # the cell did not fail: its node or its place did
ENDED = ("ok", "oom", "diverged")  # the trainer's verdict on a cell that ran to its end
_FIELD = re.compile(r"(\w+)=(\S*)")


def parse_record(text: str) -> dict[str, str]:
    """`scontrol show job -o ID`'s one line as {key: value} (JobState=TIMEOUT -> {"JobState": "TIMEOUT"})."""
    return dict(_FIELD.findall(text))


def state_of(record: dict[str, str]) -> str:
    """The job's state, without sacct's "by <uid>" ("CANCELLED by 0" -> CANCELLED)."""
    return record.get("JobState", "UNKNOWN").split()[0].rstrip("+")


def exit_code(record: dict[str, str]) -> tuple[int, int]:
    """(exit code, signal) of the batch script: ExitCode=97:0."""
    code, _, sig = record.get("ExitCode", "0:0").partition(":")
    try:
        return int(code), int(sig or 0)
    except ValueError:
        return 0, 0


def _time(value: str | None) -> datetime | None:
    if not value or value in ("Unknown", "None", "N/A"):
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value)
    return None


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return (b - a).total_seconds() if a is not None and b is not None else None


def job_result(cell: CellSpec, record: dict[str, str], out_dir: Path, cancelled_here: bool = False,
               limit: str | None = None) -> tuple[CellMetrics, str]:
    """The cell's metrics from the ended job's record and what its nodes wrote."""
    out_dir = Path(out_dir)
    state, (code, sig) = state_of(record), exit_code(record)
    nodes = read_nodes(out_dir)
    combined, log = gather(nodes)
    m = CellMetrics.from_dict(combined)
    got_metrics = nodes[0][1] is not None
    if not got_metrics:
        m.update(cell_id=cell.cell_id, world_size=cell.world_size, global_batch=cell.global_batch, outcome="error",
                 error=f"Slurm job {record.get('JobId', '?')} ended {state} (exit code {code}) and no "
                       f"metrics.json came back (see {out_dir / 'train.log'} and the job's slurm-*.out)")
    if state != "COMPLETED" and m.outcome in ("ok", "running", "error"):
        loss_curve, val_curve = read_partial(out_dir / PARTIAL_CURVES)
        if len(loss_curve) > len(m.loss_curve):
            m.update(loss_curve=loss_curve, val_curve=val_curve)
    steps_done = len(m.loss_curve)
    job = f"Slurm job {record.get('JobId', '?')}"
    if got_metrics and m.outcome in ENDED and state in ("TIMEOUT", "DEADLINE", "CANCELLED"):
        pass  # the cell had ended; what came to its job afterwards changes nothing
    elif state in ("TIMEOUT", "DEADLINE"):
        m.update(outcome="timeout", stopped_after_steps=steps_done,
                 error=f"{job} stopped at its time limit ({state}, --time={limit or record.get('TimeLimit', '?')}; "
                       f"{steps_done} steps done)")
    elif state == "OUT_OF_MEMORY":
        m.update(outcome="oom", stopped_after_steps=steps_done,
                 error=f"{job}: the node killed it for memory (OUT_OF_MEMORY; the job's memory is --mem, "
                       f"remote.mem_gb) after {steps_done} steps")
    elif state in RETRIED:
        m.update(outcome="error", error=f"{job} ended {state} ({record.get('Reason', '')}): the cell is retried "
                                        "(from its last checkpoint where train.checkpoint_every is set)")
    elif state == "CANCELLED" and not cancelled_here:
        m.update(outcome="stopped", stopped_after_steps=steps_done,
                 error=f"{job} was cancelled on the cluster (scancel) after {steps_done} steps")
    elif code == NOT_SHARED and not got_metrics:
        m.update(outcome="error",
                 error=f"{job} could not see the cell's folder {out_dir}: the run's folder must be on a filesystem "
                       "the submitting machine and the nodes share; point FINETUNE_MATRIX_REPORTS at one")
    elif state in ("FAILED", "SPECIAL_EXIT", "REVOKED") and m.outcome in ("ok", "running"):
        m.update(outcome="error", error=f"{job} ended {state} (exit code {code}, signal {sig}) after the cell")
    submitted, started, ended = (_time(record.get(k)) for k in ("SubmitTime", "StartTime", "EndTime"))
    m.update(job_id=record.get("JobId"), job_name=record.get("JobName"), job_status=state,
             job_nodes=record.get("NodeList") or None, queued_s=_seconds(submitted, started))
    if m.wall_s is None:
        m.wall_s = _seconds(started, ended)
    return m, log


def summary(record: dict[str, Any]) -> str:
    """One line for the step's log: state, nodes, reason."""
    parts = [f"{state_of(record)}"]
    if record.get("NodeList") and record["NodeList"] not in ("(null)", "None"):
        parts.append(f"on {record['NodeList']}")
    if record.get("Reason") and record["Reason"] != "None":
        parts.append(f"({record['Reason']})")
    return " ".join(parts)
