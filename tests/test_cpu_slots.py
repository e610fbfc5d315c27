"""CPU slots and priorities for real: a flow task keeps its cell's cores until it exits, and the
flow's own work runs below the cells' ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from steps.flow import cpu_slots, priority
from tests.conftest import REPO

CORES = len(os.sched_getaffinity(0))


@pytest.fixture
def slots(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_MATRIX_SLOTS_DIR", str(tmp_path))
    yield tmp_path
    cpu_slots.release_kept()


def _reserve_in_thread(ranks: int) -> tuple[threading.Thread, list]:
    got: list = []

    def take():
        with cpu_slots.reserve(ranks, per_rank=1, poll_s=0.05) as cores:
            got.append((time.monotonic(), cores))

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, got


def test_a_kept_reservation_holds_the_cores_until_its_process_exits(slots):
    hold_s = 1.5
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from steps.flow import cpu_slots
        with cpu_slots.reserve({CORES}, per_rank=1, keep=True) as cores:
            pass
        print("held", cores, flush=True)
        time.sleep({hold_s})
        """)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.startswith("held [0"), line
        asked = time.monotonic()
        thread, got = _reserve_in_thread(1)
        thread.join(timeout=30)
        (when, cores), = got
        # Not before the holder's sleep ended: its exit gave the cores back.
        assert len(cores) == 1 and when - asked > 0.8 * hold_s, when - asked
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()
        holder.wait()


def test_reserving_again_gives_back_what_this_process_kept(slots):
    with cpu_slots.reserve(CORES, per_rank=1, keep=True) as first:
        assert len(first) == CORES
    thread, got = _reserve_in_thread(CORES)  # the same process's next cell: no deadlock on itself
    thread.join(timeout=10)
    assert got and got[0][1] == first
    # Without keep the cores are free at once for another reservation.
    thread, got = _reserve_in_thread(CORES)
    thread.join(timeout=10)
    assert got and got[0][1] == first


@pytest.mark.parametrize(("argv", "bookkeeping"), [
    (["flows/finetune_matrix.py", "--quiet", "--metadata", "local", "step", "gather", "--run-id", "1"], True),
    (["flows/finetune_matrix.py", "--quiet", "--metadata", "local", "step", "start", "--run-id", "1"], False),
    (["flows/finetune_matrix.py", "--quiet", "--metadata", "local", "step", "train", "--run-id", "1"], False),
    (["flows/finetune_matrix.py", "--quiet", "--datastore-root", "/x", "card", "create", "1/train/5"], True),
    (["flows/finetune_matrix.py", "card", "server"], False),
    (["flows/finetune_matrix.py", "run"], False),
    (["flows/finetune_matrix.py", "resume"], False),
])
def test_which_processes_of_the_flow_yield_to_the_cells(argv, bookkeeping):
    assert priority.is_bookkeeping(argv) is bookkeeping


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own priority is Linux's")
def test_a_lowered_thread_starts_its_processes_below_the_rest_of_its_process():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def card_thread():
        priority.lower(thread_only=True)
        seen["thread"] = int(subprocess.run(["nice"], capture_output=True, text=True).stdout)

    thread = threading.Thread(target=card_thread)
    thread.start()
    thread.join()
    assert seen["thread"] == max(before, priority.NICE)
    assert int(subprocess.run(["nice"], capture_output=True, text=True).stdout) == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def _hold_running(run_dir, cell: str, hold_s: float, after: str | None = None,
                  then: str | None = None) -> subprocess.Popen:
    """A `train` task of another cell: once `after` exists (if given: the runtime starting it
    when another ends) plus its start-up, it runs its cell and keeps the cell's `.running` lock
    until it exits, `hold_s` later (its tracker, card, artifacts); `then` is written as it exits."""
    (run_dir / "cells" / cell).mkdir(parents=True)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from steps.flow import tasks
        while {after!r} and not Path({after!r}).exists():
            time.sleep(0.02)
        time.sleep(0.3 if {after!r} else 0)
        with tasks._running(Path({str(run_dir / "cells" / cell)!r}), keep=True):
            pass
        time.sleep({hold_s})
        if {then!r}:
            Path({then!r}).touch()
        """)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_a_failing_cell_waits_for_the_cells_beside_it_to_exit_even_one_that_starts_meanwhile(tmp_path):
    from steps.flow import tasks

    own = tmp_path / "cells" / "failing"
    own.mkdir(parents=True)
    with tasks._running(own, keep=True):
        pass  # the failing cell's own kept lock: given back first, never waited on
    ended = str(tmp_path / "first-ended")
    running = _hold_running(tmp_path, "running", hold_s=0.5, then=ended)
    late = _hold_running(tmp_path, "late", hold_s=0.3, after=ended)  # starts as the first ends
    try:
        while tmp_path / "cells/running/.running" not in tasks._busy(tmp_path):  # after its imports
            time.sleep(0.05)
        said: list[str] = []
        began = time.monotonic()
        waited = tasks.wait_for_running(tmp_path, echo=said.append, settle_s=1.0)
        took = time.monotonic() - began
        assert waited == 2 and said == ["waiting for 1 running cell(s) to finish before failing the run"] * 2
        assert running.poll() == 0 and late.poll() == 0  # both had exited
        # the first exits 0.5 s after its lock; the late one takes its lock 0.3 s later, inside
        # the settle, and exits 0.3 s after; then one more settle
        assert 0.5 + 0.3 + 0.3 + 1.0 - 0.4 < took < 0.5 + 0.3 + 0.3 + 1.0 + 5, took
    finally:
        for proc in (running, late):
            proc.kill()
            proc.wait()
