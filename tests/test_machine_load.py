"""The machine's other work while a cell's timed steps run (`measure.MachineLoad`), measured for
real beside CPU-burning processes, and the calibration store leaving busy cells out.

The measurement windows here are 1.5 s each, on two cores: "the cell" (this test's process and a
child in a session of its own, as torchrun starts each rank) spins through them, and in one window
two processes that are not in the cell's process tree burn CPU beside it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from steps.estimate import calibrate, store
from steps.plan.settings import CONTENDED_SHARE, contended
from steps.trainer.measure import MachineLoad
from tests.conftest import REPO

TWIN = REPO / "tests" / "data" / "study_twins" / "study3-ddp-fsdp-naive-cpu"
WINDOW_S = 1.5
BURN = [sys.executable, "-c", "while True: pass"]


def _jiffies(pid: int) -> int:
    text = open(f"/proc/{pid}/stat", "rb").read()
    fields = text[text.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _window(others: int) -> tuple[MachineLoad, float, float]:
    """A measurement window while this process and a child in a session of its own spin, with
    `others` burners outside this process's tree beside it: the load, and the shares of the machine's cores
    that the cell's two processes and the burners used, from their own /proc times."""
    rank = subprocess.Popen(BURN, start_new_session=True)  # the cell's second rank, as torchrun starts it
    foreign = [_orphan(BURN) for _ in range(others)]
    try:
        time.sleep(0.3)  # every burner running
        cell = [os.getpid(), rank.pid]
        before = {p: _jiffies(p) for p in cell + foreign}
        load = MachineLoad()
        t0 = time.perf_counter()
        load.start()
        while time.perf_counter() - t0 < WINDOW_S:
            pass
        load.stop()
        wall = time.perf_counter() - t0
        used = {p: _jiffies(p) - j for p, j in before.items()}
    finally:
        rank.kill()
        rank.wait()
        for pid in foreign:
            os.kill(pid, signal.SIGKILL)
    whole = len(load.cores) * wall * os.sysconf("SC_CLK_TCK")
    return load, sum(used[p] for p in cell) / whole, sum(used[p] for p in foreign) / whole


def _orphan(command: list[str]) -> int:
    """A process outside this one's tree: started by a child that exits at once (its parent is
    then init or a subreaper), in a session of its own; its pid."""
    quiet = "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL"  # else run() waits for the burner's pipes
    starter = [sys.executable, "-c",
               f"import subprocess; print(subprocess.Popen({command!r}, start_new_session=True, {quiet}).pid)"]
    return int(subprocess.run(starter, capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def two_cores():
    """This process (and the processes it starts) on two cores, as a 2-rank cell is pinned."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(before)[:2])
    yield
    os.sched_setaffinity(0, before)


@pytest.mark.slow  # burns the cores for seconds
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="/proc: Linux only")
def test_cpu_burned_beside_the_window_counts_as_other_work_and_the_cell_s_own_does_not(two_cores):
    quiet = _background() < 0.1
    alone, cell_alone, _ = _window(others=0)
    beside, cell_beside, burners = _window(others=2)
    for load in (alone, beside):
        assert load.cores == os.sched_getaffinity(0) and len(load.cores) <= 2
        assert load.load_start is not None and load.load_end is not None
        assert set(load.fields()) == {"load_avg_start", "load_avg_end", "other_cpu_share"}
        assert 0.0 <= load.other_share <= 1.0 and load.busy_share >= 0.9  # someone always spins
    # The cell's own processes (this one and its same-session rank) are its own, not other work.
    assert cell_alone > 0.1 and alone.own_share >= cell_alone - 0.03
    assert beside.own_share >= cell_beside - 0.03
    # The burners of other sessions are: the share counts at least what they used.
    assert burners > 0.05 and beside.other_share >= burners - 0.03
    # Where nothing else ran just before (a window in which this process sleeps: all of its busy
    # time is other work), the cell spinning alone is not contended and beside the burners it is:
    # the share rises from under CONTENDED_SHARE to over it.
    # On a machine shared with other work, the cell alone measured that work, as it should.
    if quiet:
        assert alone.other_share < CONTENDED_SHARE and not contended(alone.other_share)
        assert contended(beside.other_share)


def _background() -> float:
    load = MachineLoad()
    load.start()
    time.sleep(MachineLoad.MIN_WINDOW_S + 0.1)
    load.stop()
    return load.other_share


def _documents(stream, count: int) -> list:
    """The first `count` JSON documents printed on `stream`: two processes printing to one pipe
    at once may put both on one line."""
    text, found, decoder = "", [], json.JSONDecoder()
    while len(found) < count:
        line = stream.readline()
        assert line, f"the stream ended after {found}"
        text += line
        while text.strip() and len(found) < count:
            try:
                doc, end = decoder.raw_decode(text.lstrip())
            except json.JSONDecodeError:
                break  # the rest of a document is still to come
            found.append(doc)
            text = text.lstrip()[end:]
    return found


def test_the_cell_is_the_tree_of_the_process_the_launcher_started(monkeypatch):
    """As the launcher starts torchrun (in a session of its own, with its pid in the environment)
    and torchrun each rank (each in a session of its own): a rank's cell root is torchrun, and the
    cell's processes are torchrun and every rank, not the launcher nor its other children."""
    from steps.results.metrics import LAUNCHER_PID_ENV
    from steps.trainer import measure

    rank = ("import json, os, sys, time; from steps.trainer import measure; "
            "root = measure.cell_root(); "
            "print(json.dumps([root, sorted(measure._tree_jiffies(root))]), flush=True); time.sleep(30)")
    agent = ("import subprocess, sys, time; "
             f"ranks = [subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True) for _ in range(2)]; "
             "[r.wait() for r in ranks]")
    env = {**os.environ, LAUNCHER_PID_ENV: str(os.getpid()), "PYTHONPATH": str(REPO)}
    sidecar = subprocess.Popen(BURN)  # another child of the launcher (a card process): not the cell
    torchrun = subprocess.Popen([sys.executable, "-c", agent], env=env, start_new_session=True,
                                stdout=subprocess.PIPE, text=True)
    def ranks() -> list[int]:
        return sorted(pid for pid, (ppid, _) in measure._processes().items() if ppid == torchrun.pid)

    try:
        seen = _documents(torchrun.stdout, 2)
        assert len(ranks()) == 2
        for root, tree in seen:
            assert root == torchrun.pid
            assert tree == sorted([torchrun.pid, *ranks()])
        assert sidecar.pid not in seen[0][1] and os.getpid() not in seen[0][1]
    finally:
        for pid in ranks():  # before torchrun: once it is gone they are no longer its children
            os.kill(pid, signal.SIGKILL)
        os.killpg(torchrun.pid, signal.SIGKILL)
        sidecar.kill()
        torchrun.wait()
        sidecar.wait()
    # Without the launcher (a trainer started by hand, no torchrun), the process is its own cell.
    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert measure.cell_root() == os.getpid()


def test_the_window_is_opened_and_closed_once_and_a_short_one_gives_no_share():
    load = MachineLoad()
    load.stop()  # never started: nothing measured
    assert load.fields() == {"load_avg_start": None, "load_avg_end": None, "other_cpu_share": None}
    load.start()
    first = load._at_start
    load.start()
    assert load._at_start is first
    load.stop()  # at once: a few ticks would say nothing
    fields = load.fields()
    assert fields["other_cpu_share"] is None
    assert fields["load_avg_start"] >= 0 and fields["load_avg_end"] >= 0
    load.start()
    time.sleep(MachineLoad.MIN_WINDOW_S + 0.1)
    load.stop()  # closed already: still nothing
    assert load.fields() == fields


def test_contended_is_above_the_stated_share():
    assert CONTENDED_SHARE == 0.25
    assert [contended(x) for x in (0.26, 0.25, 0.0, None, float("nan"))] == [True, False, False, False, False]


def test_the_store_leaves_contended_cells_out(tmp_path):
    """Of two measured cells of a run, the one whose cores other processes kept 40% busy is not
    stored, nor fitted from a table; the one at 5% is."""
    df = pd.read_parquet(TWIN / "results.parquet").head(2).assign(other_cpu_share=[0.4, 0.05])
    busy, calm = df["cell_id"]
    entries = store.entries_of(df)
    assert [e["row"]["cell_id"] for e in entries] == [calm]
    assert entries[0]["row"]["other_cpu_share"] == 0.05
    assert store.add_run(df, folder=tmp_path) == 1
    (line,) = (tmp_path / "cpu.jsonl").read_text().splitlines()
    assert json.loads(line)["row"]["cell_id"] == calm
    assert [r.row["cell_id"] for r in calibrate.records(df)] == [calm]
    assert store.calibration([tmp_path])["source"]["cpu"]["cells"] == 1
    # a table without the measure (runs before it) keeps every measured cell
    assert len(store.entries_of(df.drop(columns=["other_cpu_share"]))) == 2
