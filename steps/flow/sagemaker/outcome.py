"""What a SageMaker job's end means for its cell: the same outcomes as a local cell.

- the trainer's own outcome (ok, oom, error, timeout, hang) from the metrics.json it uploaded,
  whatever the job's status (a failed job still brings its metrics back);
- `MaxRuntimeExceeded`: timeout;
- capacity and quota (`CapacityError`, `ResourceLimitExceeded`, insufficient capacity), a spot
  job that found no capacity in `max_wait_s`, or a job stopped from outside: error, with the
  reason, which the flow retries per `retries` (a retry resumes from the cell's checkpoints).
Pure: the job's description and the downloaded cell folder in, CellMetrics out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from steps.plan.schema import CellSpec
from steps.results.metrics import CellMetrics
from steps.results.nodes import gather, read_nodes  # node 0 measures the cell; a failed node fails it

TERMINAL = ("Completed", "Failed", "Stopped")
CAPACITY = ("CapacityError", "ResourceLimitExceeded", "InsufficientInstanceCapacity",
            "insufficient capacity", "ThrottlingException")


def refused_result(cell: CellSpec, code: str, message: str) -> CellMetrics:
    """SageMaker (or the request check) refused to create the job."""
    kind = "capacity or quota" if any(c.lower() in f"{code} {message}".lower() for c in CAPACITY) else "refused"
    return CellMetrics(cell_id=cell.cell_id, outcome="error", world_size=cell.world_size,
                       global_batch=cell.global_batch,
                       error=f"SageMaker job not created ({kind}): {code}: {message}"[:2000])


def _seconds(a, b) -> float | None:
    return (b - a).total_seconds() if a is not None and b is not None else None


def job_result(cell: CellSpec, job: dict[str, Any], out_dir: Path) -> tuple[CellMetrics, str]:
    """The cell's metrics from the ended job (`DescribeTrainingJob`) and what it uploaded."""
    status, secondary = job["TrainingJobStatus"], job.get("SecondaryStatus", "")
    reason = job.get("FailureReason") or ""
    nodes = read_nodes(Path(out_dir))
    combined, log = gather(nodes)
    m = CellMetrics.from_dict(combined)
    if nodes[0][1] is None:
        m.update(cell_id=cell.cell_id, world_size=cell.world_size, global_batch=cell.global_batch,
                 error=f"SageMaker job {status.lower()} and its metrics.json did not come back"
                       + (f": {reason}" if reason else ""))
    if status == "Stopped" and secondary == "MaxRuntimeExceeded":
        limit = job.get("StoppingCondition", {}).get("MaxRuntimeInSeconds")
        m.update(outcome="timeout", stopped_after_steps=len(m.loss_curve),
                 error=f"SageMaker stopped the job at MaxRuntimeInSeconds={limit} "
                       f"({len(m.loss_curve)} steps done){': ' + reason if reason else ''}")
    elif status == "Stopped" and secondary == "MaxWaitTimeExceeded":
        m.update(outcome="error", error=f"spot: no capacity within MaxWaitTimeInSeconds ({reason})")
    elif status == "Stopped" and m.outcome in ("ok", "running"):
        m.update(outcome="error", error=f"SageMaker job stopped before the cell ended{': ' + reason if reason else ''}")
    elif status == "Failed" and m.outcome in ("ok", "running"):
        m.update(outcome="error", error=f"SageMaker job failed: {reason or secondary}")
    training = job.get("TrainingTimeInSeconds")
    billable = job.get("BillableTimeInSeconds")
    savings = (1 - billable / training if job.get("EnableManagedSpotTraining") and billable is not None
               and training else None)
    m.update(job_name=job.get("TrainingJobName"), job_arn=job.get("TrainingJobArn"),
             job_status=f"{status}/{secondary}" if secondary else status,
             billable_s=float(billable) if billable is not None else None,
             spot_savings=round(savings, 4) if savings is not None and math.isfinite(savings) else None,
             queued_s=_seconds(job.get("CreationTime"), job.get("TrainingStartTime")))
    return m, log
