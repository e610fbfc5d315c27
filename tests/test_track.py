"""The trackers a cell logs to (issue 24): a real MLflow tracking server (SQLite, a loopback
port), TensorBoard's event files read back by tensorboard's own reader, and W&B offline run
files, against the cell's own metrics.json."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from steps.flow.launcher import free_port
from tests.conftest import make_cell, torchrun_trainer

pytest.importorskip("mlflow")
pytestmark = pytest.mark.slow  # each trains for real, beside a tracking server


@contextlib.contextmanager
def mlflow_server(root: Path):
    """`mlflow server` on a free loopback port with a SQLite backend; its URI."""
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until the app answers, not only the port
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield uri, proc
    finally:
        if proc.poll() is None:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One cell trained for real under torchrun, logging to all three trackers."""
    root = tmp_path_factory.mktemp("track")
    with mlflow_server(root / "mlflow") as (uri, _):
        cell = make_cell(train={"max_steps": 8, "eval_every": 4, "save_adapter": True},
                         track={"mlflow": {"tracking_uri": uri, "experiment": "cells"},
                                "tensorboard": {"dir": str(root / "tb")},
                                "wandb": {"project": "cells", "mode": "offline"}},
                         track_context={"run_id": "4242", "pathspec": "FinetuneMatrixFlow/4242/train/7"})
        proc, metrics = torchrun_trainer(cell, root / "cell")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run_id = json.loads((root / "cell" / "track.json").read_text())["mlflow"]["run_id"]
        run = client.get_run(run_id)
        history = client.get_metric_history(run_id, "loss")
        val = client.get_metric_history(run_id, "val_loss")
        artifacts = [a.path for a in client.list_artifacts(run_id, "adapter")]
        yield {"cell": cell, "metrics": metrics, "root": root, "run": run, "loss": history, "val": val,
               "artifacts": artifacts, "log": proc.stdout + proc.stderr}


def test_mlflow_holds_the_cell_s_settings_curve_final_metrics_and_adapter(tracked):
    run, m, cell = tracked["run"], tracked["metrics"], tracked["cell"]
    assert run.info.run_name == cell.cell_id and run.info.status == "FINISHED"
    assert run.data.tags["outcome"] == "ok" and run.data.tags["metaflow_run_id"] == "4242"
    assert run.data.tags["metaflow_pathspec"] == "FinetuneMatrixFlow/4242/train/7"
    params = run.data.params
    assert params["train.lora.r"] == str(cell.train.lora.r) and params["lr"] == str(cell.lr)
    assert params["model"] == "llama-debug" and params["train.max_steps"] == "8"
    curve = [(p["step"], p["loss"]) for p in m["loss_curve"]]
    assert [(h.step, pytest.approx(h.value, rel=1e-6)) for h in sorted(tracked["loss"], key=lambda h: h.step)] == curve
    assert max(tracked["val"], key=lambda h: h.step).value == pytest.approx(m["val_loss"], rel=1e-6)
    assert run.data.metrics["tokens_per_s"] == pytest.approx(m["tokens_per_s"], rel=1e-6)
    assert "adapter/adapter_config.json" in tracked["artifacts"]


def test_tensorboard_s_reader_reads_the_same_loss_curve(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(tracked["root"]) / "tb" / "4242" / tracked["cell"].cell_id
    events = EventAccumulator(str(folder))
    events.Reload()
    loss = [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")]
    assert loss == [(p["step"], p["loss"]) for p in tracked["metrics"]["loss_curve"]]
    assert events.Scalars("final/val_loss")[-1].value == pytest.approx(tracked["metrics"]["val_loss"], rel=1e-6)


def test_wandb_offline_run_files_hold_the_config_and_history(tracked):
    from tests.wandb_log import run_of

    runs = sorted((Path(tracked["root"]) / "cell" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = run_of(next(runs[0].glob("run-*.wandb")))
    cell, m = tracked["cell"], tracked["metrics"]
    assert run["config"]["train.lora.r"] == cell.train.lora.r and run["config"]["cell_id"] == cell.cell_id
    losses = [(h["_step"], pytest.approx(h["loss"], rel=1e-6)) for h in run["history"] if "loss" in h]
    assert losses == [(p["step"], p["loss"]) for p in m["loss_curve"]]
    assert run["summary"]["outcome"] == "ok"
    assert run["summary"]["val_loss"] == pytest.approx(m["val_loss"], rel=1e-6)
    assert run["summary"]["tokens_per_s"] == pytest.approx(m["tokens_per_s"], rel=1e-6)


FLOW_MATRIX = {
    "name": "tracked", "models": "llama-debug", "peft": "lora", "strategy": "single",
    "lr": [3e-3, 1e-2], "micro_batch": 4, "seq_len": 32,
    "train": {"max_steps": 12, "timing_warmup_steps": 2, "timeout_s": 300, "eval_every": 6},
    "data": {"train_samples": 256, "val_samples": 32},
}


@pytest.fixture(scope="module")
def tracked_flow(tmp_path_factory):
    """The two-cell matrix through the flow, logging to all three trackers, with MLflow behind a
    front that refuses every request without the user and password its URI carries, and known
    secret values in the environment (what `test_secrets` then looks for in everything written)."""
    from tests.test_flow import run_flow
    from tests.test_secrets import SECRET_VARIABLES, basic_auth_proxy

    tmp_path = tmp_path_factory.mktemp("tracked-flow")
    values = {name: f"{name.lower()}-{secrets.token_hex(16)}" for name in SECRET_VARIABLES}
    password = f"uri-password-{secrets.token_hex(16)}"
    with pytest.MonkeyPatch.context() as mp, mlflow_server(tmp_path / "mlflow") as (uri, _), \
            basic_auth_proxy(uri, "alice", password) as (front, refused):
        for name, value in values.items():
            mp.setenv(name, value)
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.delenv(name, raising=False)  # parsing the matrix here sets them: undone at the end
        tracking_uri = front.replace("http://", f"http://alice:{password}@") + "/"
        matrix = {**FLOW_MATRIX, "track": {"mlflow": {"tracking_uri": tracking_uri, "experiment": "flow"},
                                           "tensorboard": {"dir": str(tmp_path / "tb")},
                                           "wandb": {"project": "flow", "mode": "offline"}}}
        started = time.time()
        status, pathspec, output = run_flow(tmp_path, matrix, max_workers=2)
        assert status == "successful", output[-4000:]
        yield {"tmp": tmp_path, "uri": uri, "front": front, "refused": refused, "pathspec": pathspec,
               "output": output, "hidden": {**values, "the URI's password": password}, "started": started}


def test_a_two_cell_flow_logs_a_parent_run_with_its_cells_as_children(tracked_flow):
    from metaflow import Run, namespace
    from mlflow.tracking import MlflowClient

    tmp_path, uri, pathspec = tracked_flow["tmp"], tracked_flow["uri"], tracked_flow["pathspec"]
    # every request of the flow's and the trainers' clients carried the URI's credentials
    assert tracked_flow["refused"] == []
    namespace(None)
    df = Run(pathspec)["join"].task["results"].data.set_index("cell_id")
    client = MlflowClient(tracking_uri=uri)  # behind the front: no credentials needed
    experiment = client.get_experiment_by_name("flow").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.data.tags["metaflow_run_id"] == pathspec.split("/")[1]
    assert sorted(c.info.run_name for c in children) == sorted(df.index)
    for child in children:
        row = df.loc[child.info.run_name]
        assert child.info.status == "FINISHED" and child.data.tags["outcome"] == "ok"
        assert child.data.tags["metaflow_pathspec"].startswith(pathspec + "/train/")
        assert child.data.params["train.lora.r"] == str(int(row["train.lora.r"]))
        history = sorted(client.get_metric_history(child.info.run_id, "loss"), key=lambda h: h.step)
        assert [(h.step, pytest.approx(h.value, rel=1e-6)) for h in history] == [
            (p["step"], p["loss"]) for p in json.loads(row["loss_curve"])]
        assert child.data.metrics["val_loss"] == pytest.approx(row["val_loss"], rel=1e-6)
        assert "adapter/adapter_config.json" in [a.path for a in client.list_artifacts(child.info.run_id, "adapter")]
    assert {"results.parquet", "report.html"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    # the same matrix's TensorBoard folders and W&B offline runs hold the same curves
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.wandb_log import run_of

    run_id = pathspec.split("/")[1]
    for cid, row in df.iterrows():
        curve = [(p["step"], p["loss"]) for p in json.loads(row["loss_curve"])]
        events = EventAccumulator(str(tmp_path / "tb" / run_id / cid))
        events.Reload()
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")] == curve
        (offline,) = (tmp_path / "reports" / run_id / "cells" / cid / "wandb").glob("offline-run-*/run-*.wandb")
        kept = run_of(offline)
        assert kept["config"]["train.lora.r"] == int(row["train.lora.r"]) and kept["summary"]["outcome"] == "ok"
        assert [(h["_step"], pytest.approx(h["loss"], rel=1e-6)) for h in kept["history"] if "loss" in h] == curve
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_the_flow_writes_no_secret_anywhere(tracked_flow):
    """Issue 42: the URI's password and the secret variables' values are in no file of the run's
    folder or of Metaflow's datastore that this flow wrote (artifacts, logs, cards, metadata), nor
    in the terminal, nor in the trackers' parameters and tags; the provenance shows `alice:***@`."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import METAFLOW_ROOT
    from tests.test_secrets import files_holding, printed

    hidden, tmp_path, run_id = tracked_flow["hidden"], tracked_flow["tmp"], tracked_flow["pathspec"].split("/")[1]
    written = [p for p in METAFLOW_ROOT.rglob("*") if p.is_file() and p.stat().st_mtime >= tracked_flow["started"]]
    assert len(written) > 50  # the run's artifacts, logs, metadata and cards
    assert files_holding([tmp_path / "reports", tmp_path / "tb"], hidden) + files_holding(written, hidden) == []
    assert printed(tracked_flow["output"], hidden) == []
    client = MlflowClient(tracking_uri=tracked_flow["uri"])
    runs = client.search_runs([client.get_experiment_by_name("flow").experiment_id])
    assert len(runs) == 3 and all(secret not in repr(r.data.params) + repr(r.data.tags)
                                  for r in runs for secret in hidden.values())
    port = tracked_flow["front"].rsplit(":", 1)[1]
    assert f"alice:***@127.0.0.1:{port}/" in (tmp_path / "reports" / run_id / "provenance.json").read_text()


def test_an_unreachable_tracking_server_fails_start_naming_track_mlflow(tmp_path):
    import os

    import yaml

    from tests.conftest import REPO

    matrix = {**FLOW_MATRIX, "track": {"mlflow": {"tracking_uri": f"http://127.0.0.1:{free_port()}",
                                                  "experiment": "nowhere"}}}
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    env = {**os.environ, "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "finetune_matrix.py"), "--config", "matrix",
                           str(path), "run"], capture_output=True, text=True, env=env, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "track.mlflow: cannot reach the tracking server at 'http://127.0.0.1:" in output
    assert "check that `mlflow server` runs there" in output
    assert "Foreach yields" not in output  # no cell ran


def test_a_tracking_server_killed_while_the_cell_trains_leaves_the_cell_ok_with_a_warning(tmp_path):
    import os
    import signal
    import threading

    from mlflow.tracking import MlflowClient

    with mlflow_server(tmp_path / "mlflow") as (uri, server):
        cell = make_cell(train={"max_steps": 600},
                         track={"mlflow": {"tracking_uri": uri, "experiment": "killed"}})
        done: dict = {}
        trainer = threading.Thread(target=lambda: done.update(zip(("proc", "metrics"),
                                                                 torchrun_trainer(cell, tmp_path / "cell"))))
        trainer.start()
        client, track = MlflowClient(tracking_uri=uri), tmp_path / "cell" / "track.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and trainer.is_alive():  # the first metrics reached the server
            if track.exists() and client.get_metric_history(json.loads(track.read_text())["mlflow"]["run_id"], "loss"):
                break
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        trainer.join(timeout=300)
    proc, metrics = done["proc"], done["metrics"]
    assert proc.returncode == 0 and metrics["outcome"] == "ok", proc.stderr[-3000:]
    assert len(metrics["loss_curve"]) == 600
    log = proc.stdout + proc.stderr
    assert log.count("warning: track.mlflow failed") == 1, log[-3000:]
    assert "the cell goes on without it, its metrics are in metrics.json" in log


def test_a_hung_cell_s_run_is_closed_killed_with_its_curve_so_far(tmp_path):
    from mlflow.tracking import MlflowClient

    from steps.flow import launcher, tracking

    with mlflow_server(tmp_path / "mlflow") as (uri, _):
        cell = make_cell(train={"max_steps": 50, "hang_after_s": 3, "fault": {"kind": "hang", "at_step": 20}},
                         track={"mlflow": {"tracking_uri": uri, "experiment": "hung"}})
        out = tmp_path / "cell"
        m = launcher.run_cell(cell, out, echo=False)
        assert m.outcome == "hang" and len(m.loss_curve) == 19
        tracking.close_cell(cell, out, m.to_dict())
        client = MlflowClient(tracking_uri=uri)
        run_id = json.loads((out / "track.json").read_text())["mlflow"]["run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["outcome"] == "hang"
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda h: h.step)
        assert [h.step for h in history] == list(range(1, 20))
        assert [h.value for h in history] == pytest.approx([p.loss for p in m.loss_curve], rel=1e-6)
