"""What each step of the flow does, as plain functions (the flow file only wires them)."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import sys
import tarfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metaflow.exception import MetaflowException

from steps import git_commit, plain, reports_root
from steps.estimate import calibrate, matrix_plan
from steps.flow import compute, cpu_slots, launcher, priority, tracking
from steps.flow.problems import PROBLEMS_FILE
from steps.plan import catalog, equivalence
from steps.plan.credentials import redact_tree, unset_names
from steps.plan.matrix import parse_matrix
from steps.plan.schema import CellSpec, ConfigError
from steps.results.metrics import HEARTBEAT_DIR, PARTIAL_CURVES, CellMetrics, versions

if TYPE_CHECKING:  # only join reads tables: the other steps start without pandas
    import pandas as pd

START_ROWS = 100  # cells of the plan's table in start's log (a 1,000-row table took 2.6 s to draw)
PLAN_CSV = calibrate.PLAN_CSV


def run_dir(run_id: str) -> Path:
    """reports/<run id>/: run ids are unique, so a run never writes into another's folder."""
    return reports_root() / str(run_id)


def plan(matrix: dict[str, Any], run_id: str | None = None, flow: str = "FinetuneMatrixFlow",
         ) -> tuple[list[dict[str, Any]], list[tuple[dict, dict]], dict[str, Any] | None]:
    """The cells that will run (the foreach), and the `skipped` rows of those that will not,
    after the checks that need the models and data (`preflight`) and the planner's (`plan:`
    settings, cells predicted far beyond their memory): the refused cells start no task, their
    rows join the table as they are. A problem, or a matrix of which no cell can run, fails
    `start` before any cell runs (`MatrixRefused`: the problems, without a traceback). The plan's
    table goes to the step's log. Also, under `economy:`, the planner's saving as predicted
    before launch (`Saving.to_dict()`), which the report sets against the measured one. The plan
    (every column, the probe entries, the calibrations used) goes to `plan.csv` in the run's
    folder, which the report scores against what ran. The trackers (`track:`) are checked and
    the MLflow parent run opened: each cell carries its context. Under SageMaker, the variables
    `remote.env` names must be set here: the jobs get their values from this environment."""
    spec = parse_matrix(plain(matrix))
    try:
        if spec.compute == "sagemaker" and (unset := unset_names(spec.remote.env)):
            raise ConfigError([f"remote.env: {', '.join(unset)} not set on this machine; each cell's job gets the "
                               "variables remote.env names from the environment the flow starts in"], spec.name)
        if spec.compute == "slurm":
            from steps.flow.slurm.submit import missing_client

            if reason := missing_client():
                raise ConfigError([reason], spec.name)
        planned, planned_matrix = matrix_plan.plan_spec(spec, check="always")
        if all(p.refused for p in planned):
            raise ConfigError(nothing_runs(planned), spec.name)
        context = tracking.start(spec, str(run_id or "local"), flow)
    except ConfigError as exc:
        raise refused(exc, run_id) from None
    matrix_plan.show(planned, planned_matrix, max_rows=START_ROWS)
    if run_id is not None:
        path = matrix_plan.write_csv(planned, planned_matrix, run_dir(run_id) / PLAN_CSV)
        print(f"plan: {path}")
    saving = planned_matrix.saving
    cells = [p.to_dict() for p in planned if not p.refused]
    if context is not None:
        for c in cells:
            c["cell"]["track_context"] = context.model_dump(mode="json")
    skipped = [(p.cell.model_dump(mode="json"), launcher.skipped_metrics(p.cell, p.refused).to_dict())
               for p in planned if p.refused]
    return cells, skipped, (saving.to_dict() if saving is not None else None)


def nothing_runs(planned: list) -> list[str]:
    """Why no cell of a matrix can run: each distinct refusal, with how many cells it holds."""
    reasons: dict[str, list[str]] = {}
    for p in planned:
        reasons.setdefault(p.refused, []).append(p.cell.cell_id)
    return [f"no cell can run: {len(ids)} cell(s) refused ({ids[0]}{', ...' if len(ids) > 1 else ''}): {why}"
            for why, ids in reasons.items()]


DRY_RUN = "dry run (plan.dry_run: true): the cell's tasks ran, its trainer did not"


class MatrixRefused(MetaflowException):
    """`start` found problems: Metaflow prints this one's message without a traceback."""

    headline = "The matrix cannot run"


def refused(exc: ConfigError, run_id: str | None) -> MatrixRefused:
    """The problems for the terminal; the traceback into the run's folder (`start-error.log`),
    for whoever debugs the checks themselves; the problems also where the runtime prints them
    last (`problems_last`)."""
    message = str(exc)
    if run_id is not None:
        log = run_dir(run_id) / "start-error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("".join(traceback.format_exception(exc)))
        message = f"(the traceback: {log})\n{message}"
    if os.environ.get(PROBLEMS_FILE):
        Path(os.environ[PROBLEMS_FILE]).write_text(str(exc) + "\n")
    return MatrixRefused(message)


class CellFailed(RuntimeError):
    """A real failure of a cell (not oom/timeout/hang): fails its branch, so `resume` re-runs it."""


def placement(planned: dict[str, Any], matrix: dict[str, Any]) -> tuple[int, int]:
    """How many @parallel tasks (nodes) the cell needs, and the rendezvous port they share.
    A SageMaker or Slurm cell is one task: its job holds all the cell's instances or nodes."""
    one = planned["refused"] or matrix["compute"] in JOBS
    return (1 if one else int(planned["cell"]["nodes"])), launcher.free_port()


def node_dir(out_root: Path, cell: CellSpec, node_index: int) -> Path:
    base = Path(out_root) / "cells" / cell.cell_id
    return base if node_index == 0 else base / f"node{node_index}"


RUNNING_LOCK = ".running"  # held while a cell runs (`_running`)
REMOTE = ("kubernetes", "batch")  # computes whose train task runs in a container that is gone after it
JOBS = ("sagemaker", "slurm")  # computes whose train task submits the cell as one job and follows it
# What a remote node's folder leaves behind: checkpoints (large; a multi-node cell's need storage
# every node reaches anyway) and the launcher's working files.
LEFT_BEHIND = ("checkpoints", HEARTBEAT_DIR, PARTIAL_CURVES, RUNNING_LOCK)


def node_files(matrix: dict[str, Any], out_root: Path, cell: dict[str, Any], node_index: int) -> bytes | None:
    """A remote node's folder (its cell file, metrics, log, trained adapter, tracker files) as a
    gzipped tar, for the task's artifacts: under `compute: kubernetes` or `batch` the container
    that wrote it is gone once the task ends. `gather` unpacks it into this run's folder."""
    if matrix["compute"] not in REMOTE:
        return None
    out = node_dir(out_root, CellSpec.model_validate(cell), node_index)
    if not out.is_dir():
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(out.iterdir()):
            if path.name not in LEFT_BEHIND and not path.name.startswith("node"):  # other nodes bring their own
                tar.add(path, arcname=path.name)
    return buffer.getvalue()


def keep_node_files(out_root: Path, cell: dict[str, Any], files: list[tuple[int, bytes | None]]) -> None:
    """The remote nodes' folders (`node_files`) unpacked where a local cell's would be. A file the
    run folder already has (a cell that ran here) is kept as it is."""
    spec = CellSpec.model_validate(cell)
    for node_index, blob in files:
        if not blob:
            continue
        out = node_dir(out_root, spec, node_index)
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            members = [m for m in tar.getmembers() if not (out / m.name).exists()]
            tar.extractall(out, members=members, filter="data")


def train_node(planned: dict[str, Any], out_root: Path, node_index: int = 0,
               main_ip: str = "127.0.0.1", port: int | None = None,
               matrix: dict[str, Any] | None = None, run: tuple[str, int, str | None] | None = None,
               pathspec: str | None = None, card: Any = None, in_task: bool = False) -> tuple[dict[str, Any], str]:
    """Run this node's share of a cell; returns its metrics and its log. With `compute:
    sagemaker` the cell is one training job (`run`: run id, attempt, origin run id).
    `pathspec`: the task's, which the cell's tracker runs are tagged with; `card`: the task's
    live card (node 0 draws the cell's progress on it while it trains). `in_task`: called by
    the flow's `train` task, which keeps the cell's cores until it exits and, once the trainer
    has exited, yields the CPU to the cells still training (`priority`)."""
    cell = equivalence.run_spec(planned)  # a speed cell trains its speed steps
    if pathspec and cell.track_context is not None:
        cell = cell.model_copy(update={"track_context": cell.track_context.model_copy(update={"pathspec": pathspec})})
    if planned["refused"]:
        return launcher.skipped_metrics(cell, planned["refused"]).to_dict(), ""
    if matrix is not None and matrix["plan"].get("dry_run"):
        return launcher.skipped_metrics(cell, DRY_RUN).to_dict(), ""
    live = None
    if card is not None and node_index == 0 and (matrix is None or matrix["compute"] != "sagemaker") \
            and _live_card_renders(matrix):
        from steps.flow.cards import LiveCard

        live = LiveCard(card, planned["cell"], node_dir(out_root, cell, node_index),
                        ranks_here=matrix is None or matrix["compute"] != "slurm")
    m, log = _train_node(cell, out_root, node_index, main_ip, port, matrix, run, in_task)
    if in_task:
        priority.lower()  # what is left of this task (card, artifacts) is bookkeeping
    if live is not None:
        live.finish(m.to_dict())
    economy = planned.get("economy") or {}
    m.update(economy_role=economy.get("role"), quality_class=economy.get("quality_class"),
             quality_from=economy.get("quality_from"))
    return m.to_dict(), log


def _live_card_renders(matrix: dict[str, Any] | None) -> bool:
    """A remote task on Metaflow's local metadata cannot draw its live card: the card command it
    starts looks the task up in the container's own metadata, finds nothing, and fails at every
    redraw (seconds each, measured through moto's Batch). With a metadata service it can."""
    if matrix is None or matrix["compute"] not in REMOTE:
        return True
    from metaflow import current

    return not str(getattr(current, "metadata_str", "") or "").startswith("local")


def _train_node(cell: CellSpec, out_root: Path, node_index: int, main_ip: str, port: int | None,
                matrix: dict[str, Any] | None, run: tuple[str, int, str | None] | None,
                keep_devices: bool = False) -> tuple[CellMetrics, str]:
    out = node_dir(out_root, cell, node_index)
    out.mkdir(parents=True, exist_ok=True)
    if matrix is not None and matrix["compute"] == "sagemaker":
        from steps.flow.sagemaker import submit  # the SDK loads only where it is used

        run_id, attempt, origin = run or (Path(out_root).name, 0, None)
        with _running(out, keep=keep_devices):
            return submit.run_cell(cell, out, plain(matrix)["remote"], run_id, attempt, origin)
    if matrix is not None and matrix["compute"] == "slurm":
        from steps.flow.slurm import submit as slurm

        with _running(out, keep=keep_devices):  # the cell's folder is shared: no files to carry back
            m, log = slurm.run_cell(cell, out, plain(matrix)["remote"])
        tracking.close_cell(cell, out, m.to_dict())
        return m, log
    with _running(out, keep=keep_devices):
        m = launcher.run_cell(cell, out, node_rank=node_index, master_addr=main_ip, port=port,
                              keep_devices=keep_devices)
    if node_index == 0:
        tracking.close_cell(cell, out, m.to_dict())
        m.cost_usd = catalog.cost_usd(cell.instance, m.wall_s, cell.nodes, cell.world_size)
    return m, (out / "train.log").read_text(errors="replace")


_KEPT_RUNNING: list = []  # this task's `.running` lock, held until it exits (`keep`)
SETTLE_S = 5.0  # how long a failing cell looks again for a cell the runtime has just started


@contextlib.contextmanager
def _running(out: Path, keep: bool = False):
    """A lock held while the cell runs: a failing cell waits on it (see wait_for_running).
    `keep` (the flow's `train` task): held until the task exits, so the work after training
    (tracker, card, artifacts: niced, several seconds) is not stopped either."""
    lock = out / RUNNING_LOCK
    fh = open(lock, "w")
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if keep:
            if not _KEPT_RUNNING:
                atexit.register(_release_running)  # the file goes as the task exits; the lock with it
            _KEPT_RUNNING.append((lock, fh))
        else:
            lock.unlink(missing_ok=True)
            fh.close()


def _release_running() -> None:
    while _KEPT_RUNNING:
        lock, fh = _KEPT_RUNNING.pop()
        lock.unlink(missing_ok=True)
        fh.close()


def _busy(out_root: Path) -> list[Path]:
    busy = []
    for lock in sorted(Path(out_root).glob(f"cells/*/{RUNNING_LOCK}")):
        with contextlib.suppress(FileNotFoundError), open(lock) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                busy.append(lock)
    return busy


def wait_for_running(out_root: Path, echo=print, settle_s: float = SETTLE_S) -> int:
    """Block until no other cell of this run is running here; returns how many were waited on.

    Metaflow's local runtime stops every running task when one fails: a cell that fails for
    real waits for the cells running beside it, so their results are kept and `resume`
    re-runs only what failed. A cell the runtime starts meanwhile is waited on too: it looks for
    one for `settle_s` after the others have ended (a task takes seconds to reach its lock). This
    task's own lock and the cores it kept go back first: a cell beside it may wait for them.
    """
    _release_running()
    cpu_slots.release_kept()
    waited: set[Path] = set()
    while True:
        busy = _busy(out_root)
        until = time.monotonic() + settle_s
        while not busy and time.monotonic() < until:  # a cell that starts meanwhile takes its lock
            time.sleep(0.1)
            busy = _busy(out_root)
        if not busy:
            return len(waited)
        echo(f"waiting for {len(busy)} running cell(s) to finish before failing the run")
        for lock in busy:
            waited.add(lock)
            with contextlib.suppress(FileNotFoundError), open(lock) as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)


def fail_if_error(metrics: dict[str, Any], out_root: Path, matrix: dict[str, Any], attempt: int) -> None:
    """Outcomes ok/oom/timeout/hang/skipped are results; `error` fails the task, so @retry
    runs it again and then the run fails (or @catch records it, `on_error: record`)."""
    if metrics.get("outcome") != "error":
        return
    final = attempt >= int(matrix["retries"])
    if final and matrix["on_error"] == "record" and not compute.catches(matrix):
        return  # no @catch here: the row records the error
    if final and matrix["on_error"] == "fail" and matrix["compute"] in ("local", *JOBS):
        wait_for_running(out_root)  # a job: a killed step could not stop it
    raise CellFailed(f"{metrics.get('cell_id')}: {metrics.get('error')}")


def provenance(run_id: str, flow: str, matrix: dict[str, Any],
               planned_saving: dict[str, Any] | None = None) -> dict[str, Any]:
    """What made the run: its matrix, commit and versions, and `economy:`'s predicted saving.
    The matrix as parsed has its URIs' credentials redacted already; a run resumed from one
    parsed before that may not (`redact_tree`)."""
    matrix = redact_tree(plain(matrix))
    blob = json.dumps(matrix, sort_keys=True, default=str).encode()
    commit = git_commit()
    return {"run_id": run_id, "flow": flow, "matrix": matrix.get("name", ""),
            "matrix_sha256": hashlib.sha256(blob).hexdigest(), "git_commit": commit,
            "versions": versions(), "matrix_spec": matrix,
            **({"economy_plan": planned_saving} if planned_saving is not None else {})}


def link_cloned_cells(records: list[tuple[dict, dict]], out_dir: Path) -> None:
    """A resumed run re-runs failed cells only; the folders of the cells it cloned stay in the
    origin run's folder. Link them, so every cell of this run is under its folder."""
    for cell, m in records:
        here, there = out_dir / "cells" / cell["cell_id"], m.get("out_dir")
        if there and not here.exists() and Path(there).is_dir():
            here.parent.mkdir(parents=True, exist_ok=True)
            here.symlink_to(Path(there).resolve(), target_is_directory=True)


def keep_plan(records: list[tuple[dict, dict]], out_dir: Path) -> None:
    """A resumed run's `start` is cloned, not run: its plan.csv is the origin run's (found
    beside the cells it cloned), copied into this run's folder."""
    import shutil

    if (out_dir / PLAN_CSV).exists():
        return
    for _, m in records:
        there = Path(m["out_dir"]).parent.parent / PLAN_CSV if m.get("out_dir") else None
        if there is not None and there.exists():
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(there, out_dir / PLAN_CSV)
            return


def join(run_id: str, records: list[tuple[dict, dict]], out_dir: Path,
         meta: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, str], list | None]:
    """The results table, provenance and report; also the report's blocks, which the `end`
    step turns into its card (None where the report could not be built)."""
    from steps.results import table as results
    from steps.results.sharing import share_quality

    records = share_quality(records)  # economy: speed cells take their class's quality
    df = results.build_table(run_id, records)
    paths = results.write(df, out_dir)
    learn(df, out_dir)
    link_cloned_cells(records, out_dir)
    keep_plan(records, out_dir)
    (out_dir / "provenance.json").write_text(json.dumps(meta, indent=2))
    if (out_dir / PLAN_CSV).exists():  # the plan start printed: the report scores it
        meta = {**meta, "plan_csv": str(out_dir / PLAN_CSV)}
    from steps.report import build as report  # here: only join draws figures (matplotlib)

    blocks = None
    try:
        blocks = report.build(df, meta, out_dir)
        paths.update(report.write_blocks(blocks, out_dir, meta))
    except Exception:  # the results are saved: a report bug must not lose the run
        error = traceback.format_exc()
        print(error, file=sys.stderr)
        paths["report"] = out_dir / "report.md"
        paths["report"].write_text(
            f"# finetune-matrix report: {meta.get('matrix', '')}\n\nThe report could not be built; the results "
            f"table is in `results.parquet`. Rebuild it with\n`python -m steps.report {out_dir} --out {out_dir}`."
            f"\n\n```\n{error}```\n")
        blocks = None
    if records:  # the MLflow parent run (`track:`) gets the table and the report
        tracking.finish(CellSpec.model_validate(records[0][0]), paths)
    return df, {k: str(v) for k, v in paths.items()}, blocks


def learn(df: pd.DataFrame, out_dir: Path) -> None:
    """The run's measured cells into the calibration store, with the probe entries `start`
    planned them with, so that the next plan is calibrated on them (a store that cannot be
    written never loses the run)."""
    from steps.estimate import store

    try:
        n = store.add_run(df, calibrate.run_probes([out_dir]))
        print(f"calibration store: {n} measured cells of this run added ({store.root()})")
    except Exception:  # noqa: BLE001
        print(f"the calibration store was not updated:\n{traceback.format_exc()}", file=sys.stderr)


def report_card(blocks: list | None, paths: dict[str, str]) -> list:
    """The end step's card: the report's blocks (findings, tables, figures) as card
    components; report.md as it is where the report could not be built."""
    from metaflow.cards import Markdown

    if blocks is None:
        return [Markdown(Path(paths["report"]).read_text())]
    from steps.report.render import card_components

    return card_components(blocks)
