"""The flow's side of the trackers (`track:`): `start` checks each one can be reached and opens
the matrix run's MLflow parent run; a cell the launcher stopped (hang, timeout) gets its
tracker run closed with that outcome; `join` logs the results table and the report to the
parent. The cells' own runs are the trainer's (`steps.trainer.track`). No torch.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from steps import REPO_ROOT, git_commit
from steps.plan.credentials import MissingCredentials, client_uri, redact
from steps.plan.schema import CellSpec, MatrixSpec, TrackContext
from steps.results.metrics import TRACK_FILE, mlflow_status

# An unreachable server answers within seconds, not after MLflow's default retries (minutes).
CHECK_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackerUnreachable(ValueError):
    """A tracker the matrix names cannot be used: the run fails in `start`, before any cell."""


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=client_uri(uri))  # the credentials: in MLflow's variables


def start(spec: MatrixSpec, run_id: str, flow: str) -> TrackContext | None:
    """Every tracker checked (all problems at once) and the MLflow parent run opened; the
    context each cell's trainer logs under. None where the matrix tracks nothing."""
    track = spec.track
    if not track.any():
        return None
    problems, parent, experiment, commit = [], None, None, git_commit()
    if track.mlflow is not None:
        saved = {k: os.environ.get(k) for k in CHECK_ENV}
        os.environ.update(CHECK_ENV)
        try:
            client = _client(track.mlflow.tracking_uri)
            found = client.get_experiment_by_name(track.mlflow.experiment)
            experiment = found.experiment_id if found else client.create_experiment(track.mlflow.experiment)
            parent = client.create_run(experiment, run_name=f"{spec.name}-{run_id}", tags={
                "metaflow_run_id": run_id, "metaflow_pathspec": f"{flow}/{run_id}", "matrix": spec.name,
                **({"git_commit": commit} if commit else {})}).info.run_id
        except MissingCredentials as exc:
            problems.append(f"track.mlflow.tracking_uri: {exc}")
        except Exception as exc:  # noqa: BLE001 - whatever the client raises, say what to check
            why = redact(str(exc).splitlines()[0][:200])
            problems.append(f"track.mlflow: cannot reach the tracking server at {redact(track.mlflow.tracking_uri)!r} "
                            f"({type(exc).__name__}: {why}); check that `mlflow server` runs there and that this "
                            "machine can reach it")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if track.tensorboard is not None:
        root = Path(track.tensorboard.dir)
        root = root if root.is_absolute() else REPO_ROOT / root
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-check-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            problems.append(f"track.tensorboard.dir: cannot write to {str(root)!r} ({exc.strerror})")
    if track.wandb is not None and track.wandb.mode == "online" and not _wandb_key():
        problems.append("track.wandb: mode 'online' needs a W&B API key (WANDB_API_KEY or `wandb login`); "
                        "allowed modes: online, offline, disabled")
    if problems:
        raise TrackerUnreachable("the matrix's trackers cannot be used:\n  " + "\n  ".join(problems))
    return TrackContext(run_id=str(run_id), pathspec=f"{flow}/{run_id}", git_commit=commit,
                        mlflow_parent=parent, mlflow_experiment_id=experiment)


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def close_cell(cell: CellSpec, out_dir: Path, metrics: dict[str, Any]) -> None:
    """A cell whose trainer was stopped (hang, timeout) or killed could not close its MLflow
    run with its outcome: its curve so far topped up from what the launcher kept (the steps the
    trainer had not sent yet), and the run closed with the cell's outcome."""
    if cell.track.mlflow is None:
        return
    try:
        ids = json.loads((Path(out_dir) / TRACK_FILE).read_text())["mlflow"]
    except (OSError, ValueError, KeyError):
        return
    outcome = metrics.get("outcome") or "error"
    try:
        client = _client(ids["tracking_uri"])
        run = client.get_run(ids["run_id"])
        # A trainer stopped by the launcher closes its run as an error: the launcher's word wins.
        if run.info.status != mlflow_status(outcome) or run.data.tags.get("outcome") != outcome:
            _top_up(client, ids["run_id"], metrics)
            client.set_tag(ids["run_id"], "outcome", outcome)
            client.set_terminated(ids["run_id"], status=mlflow_status(outcome))
    except Exception as exc:  # noqa: BLE001 - a tracker never fails a cell
        print(f"warning: track.mlflow: could not close the cell's run ({type(exc).__name__}: {redact(str(exc))})")


def _top_up(client: Any, run_id: str, metrics: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    sent = max((m.step for m in client.get_metric_history(run_id, "loss")), default=0)
    now = int(time.time() * 1000)
    rest = [Metric(key, float(p[key]), now, int(p["step"])) for p in metrics.get("loss_curve") or []
            if p["step"] > sent for key in ("loss", "lr") if p.get(key) is not None]
    for i in range(0, len(rest), 900):
        client.log_batch(run_id, metrics=rest[i : i + 900])


def finish(cell: CellSpec, paths: dict[str, Any]) -> None:
    """The results table and the report on the MLflow parent run (`cell`: any cell of the run,
    which carries its context), which is then closed."""
    context = cell.track_context
    if context is None or not context.mlflow_parent or cell.track.mlflow is None:
        return
    try:
        client = _client(cell.track.mlflow.tracking_uri)
        for key in ("parquet", "csv", "html", "report"):
            if paths.get(key) and Path(paths[key]).exists():
                client.log_artifact(context.mlflow_parent, str(paths[key]))
        client.set_terminated(context.mlflow_parent, status="FINISHED")
    except Exception as exc:  # noqa: BLE001 - the results are saved: a tracker must not lose the run
        print(f"warning: track.mlflow: could not log the results to the parent run ({type(exc).__name__}: "
              f"{redact(str(exc))})")
