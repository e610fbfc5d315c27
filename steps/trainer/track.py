"""The trackers a cell logs to while it trains (MLflow, Weights & Biases, TensorBoard), from
rank 0: its settings as parameters, each step's loss, learning rate, tokens/s and memory, each
evaluation, and the final metrics, all under the names `metrics.json` and the results table use.

A tracker that fails never fails the cell: one warning in the log, that tracker dropped, the
metrics still in `metrics.json`. Each library is imported only when the matrix asks for it. The
MLflow run's id goes to `track.json` in the cell's folder, so that the flow can close the run
with the cell's outcome even when the trainer was stopped (hang, timeout).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from steps.plan.credentials import client_uri, redact
from steps.plan.schema import AXIS_FIELD, CellSpec
from steps.results.metrics import TRACK_FILE, LossPoint, ValPoint, mlflow_status

RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
FLUSH_S = 1.0  # metrics buffered at most this long before they go to the server
FINAL = ("tokens_per_s", "tokens_per_s_per_device", "step_s", "mfu", "achieved_tflops", "peak_mem_gb",
         "val_loss", "accuracy", "token_accuracy", "final_train_loss", "train_s", "eval_s", "epochs")


def params_of(cell: CellSpec) -> dict[str, Any]:
    """Every axis and every `train.*`/`data.*` setting by its dotted name, as the results
    table has them."""
    from steps.plan.settings import flatten

    axes = {field: getattr(cell, field) for field in AXIS_FIELD.values()}
    return {"cell_id": cell.cell_id, "matrix": cell.matrix, **axes, **flatten(cell)}


def tags_of(cell: CellSpec) -> dict[str, str]:
    ctx = cell.track_context
    tags = {"cell_id": cell.cell_id, "matrix": cell.matrix}
    if ctx is not None:
        tags.update({"metaflow_run_id": ctx.run_id, "metaflow_pathspec": ctx.pathspec,
                     **({"git_commit": ctx.git_commit} if ctx.git_commit else {})})
    return tags


class Tracker(Protocol):
    name: str

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, outcome: str, final: dict[str, float], adapter: str | None) -> None: ...


class MlflowTracker:
    """A child run of the matrix run's parent (`track_context.mlflow_parent`), named by the
    cell id; metrics sent in batches (a request per step would slow a short step down)."""

    name = "mlflow"

    def __init__(self, cell: CellSpec, out: Path):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        settings, ctx = cell.track.mlflow, cell.track_context
        for key, value in RETRIES.items():  # a server gone mid-run costs seconds, not minutes of retries
            os.environ.setdefault(key, value)
        # The URI without its credentials, which MLflow reads from its own variables (steps.plan.credentials).
        self.client = MlflowClient(tracking_uri=client_uri(settings.tracking_uri))
        experiment = (ctx.mlflow_experiment_id if ctx and ctx.mlflow_experiment_id else
                      _experiment_id(self.client, settings.experiment))
        tags = {**tags_of(cell), "outcome": "running"}
        if ctx is not None and ctx.mlflow_parent:
            tags["mlflow.parentRunId"] = ctx.mlflow_parent
        self.run_id = self.client.create_run(experiment, run_name=cell.cell_id, tags=tags).info.run_id
        (out / TRACK_FILE).write_text(json.dumps({"mlflow": {"run_id": self.run_id,
                                                             "tracking_uri": redact(settings.tracking_uri)}}))
        params = [Param(k, str(v)) for k, v in params_of(cell).items()]
        for i in range(0, len(params), 100):  # the server takes at most 100 parameters a request
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.pending: list[Any] = []
        self.sent = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None)
        if time.monotonic() - self.sent > FLUSH_S or len(self.pending) >= 900:
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        for i in range(0, len(batch), 900):  # at most 1000 metrics a request
            self.client.log_batch(self.run_id, metrics=batch[i : i + 900])
        self.sent = time.monotonic()

    def finish(self, outcome: str, final: dict[str, float], adapter: str | None) -> None:
        self.log({k: v for k, v in final.items() if k != "step"}, step=int(final.get("step", 0)))
        self.flush()
        if adapter:
            self.client.log_artifacts(self.run_id, adapter, "adapter")
        self.client.set_tag(self.run_id, "outcome", outcome)
        self.client.set_terminated(self.run_id, status=mlflow_status(outcome))


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)


class TensorboardTracker:
    """Event files in `<dir>/<run id>/<cell id>`; the settings as a text summary."""

    name = "tensorboard"

    def __init__(self, cell: CellSpec, out: Path):
        from torch.utils.tensorboard import SummaryWriter

        from steps import REPO_ROOT

        root = Path(cell.track.tensorboard.dir)
        root = root if root.is_absolute() else REPO_ROOT / root
        run = cell.track_context.run_id if cell.track_context else "local"
        self.dir = root / run / cell.cell_id
        self.writer = SummaryWriter(log_dir=str(self.dir), flush_secs=int(FLUSH_S * 5) or 1)
        table = "\n".join(f"| {k} | {v} |" for k, v in params_of(cell).items())
        self.writer.add_text("params", "| setting | value |\n|---|---|\n" + table, 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    def finish(self, outcome: str, final: dict[str, float], adapter: str | None) -> None:
        step = int(final.get("step", 0))
        self.log({f"final/{k}": v for k, v in final.items() if k != "step"}, step)
        self.writer.add_text("outcome", outcome, step)
        self.writer.close()


class WandbTracker:
    """A W&B run named by the cell id in the group of the matrix run; offline runs keep their
    files under the cell's folder (`wandb/`)."""

    name = "wandb"

    def __init__(self, cell: CellSpec, out: Path):
        import wandb

        settings, ctx = cell.track.wandb, cell.track_context
        self.run = wandb.init(project=settings.project, entity=settings.entity, mode=settings.mode,
                              name=cell.cell_id, group=ctx.run_id if ctx else None, dir=str(out),
                              config=params_of(cell), tags=[cell.matrix] if cell.matrix else None,
                              notes=json.dumps(tags_of(cell)), reinit="create_new")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self, outcome: str, final: dict[str, float], adapter: str | None) -> None:
        if adapter:
            import wandb

            artifact = wandb.Artifact(f"adapter-{self.run.name}", type="model")
            artifact.add_dir(adapter)
            self.run.log_artifact(artifact)
        self.run.summary.update({k: v for k, v in final.items() if v is not None and k != "step"})
        self.run.summary["outcome"] = outcome
        self.run.finish(exit_code=0 if outcome == "ok" else 1)


KINDS = {"mlflow": MlflowTracker, "wandb": WandbTracker, "tensorboard": TensorboardTracker}


class Trackers:
    """Every tracker the cell asks for, on rank 0 (none elsewhere); one that fails is dropped
    with a warning."""

    def __init__(self, cell: CellSpec | None = None, out: Path | None = None, main: bool = False):
        self.active: list[Tracker] = []
        if cell is None or not main or not cell.track.any():
            return
        for name, kind in KINDS.items():
            if getattr(cell.track, name) is not None:
                self._guard(name, lambda kind=kind: self.active.append(kind(cell, out)))

    def _guard(self, name: str, call) -> bool:
        try:
            call()
            return True
        except Exception as exc:  # noqa: BLE001 - a tracker never fails the cell
            print(f"warning: track.{name} failed ({type(exc).__name__}: {redact(str(exc))[:300]}); the cell goes on "
                  "without it, its metrics are in metrics.json", file=sys.stderr, flush=True)
            return False

    def _each(self, method: str, *args) -> None:
        for t in list(self.active):
            if not self._guard(t.name, lambda t=t: getattr(t, method)(*args)):
                self.active.remove(t)

    def step(self, point: LossPoint, tokens_per_s: float | None, peak_mem_gb: float | None) -> None:
        if self.active:
            self._each("log", {"loss": point.loss, "lr": point.lr, "tokens_per_s": tokens_per_s,
                               "peak_mem_gb": peak_mem_gb}, point.step)

    def evaluate(self, point: ValPoint) -> None:
        if self.active:
            self._each("log", {"val_loss": point.val_loss, "accuracy": point.accuracy,
                               "token_accuracy": point.token_accuracy}, point.step)

    def finish(self, outcome: str, metrics: dict[str, Any], step: int, adapter: str | None = None) -> None:
        """The final metrics (those of `metrics.json` that are numbers), the adapter (PEFT's
        folder) and the outcome."""
        final = {k: metrics.get(k) for k in FINAL if isinstance(metrics.get(k), int | float)}
        self._each("finish", outcome, {**final, "step": step}, adapter)
        self.active = []
