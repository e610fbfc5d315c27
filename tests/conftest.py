"""Shared helpers: cells for the tiny debug model, and a real torchrun launch of the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import peft  # noqa: F401  (before any test loads Metaflow: see below)
import pytest
import yaml

from steps.plan.matrix import cell_id
from steps.plan.schema import CellSpec

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Metaflow's Runner loads the flow file in this process and leaves its vendored
# typing_extensions behind; torch, transformers and peft imported after that fail. Importing
# them first (peft pulls in the other two) keeps the in-process tests that use them working.
# Metaflow reads its settings when first imported: point its local datastore at a scratch
# folder for the whole session, before any test imports it, and give it a user name (CI
# machines may have no USER). Flows run with this folder as their working directory: local
# cards are written under the working directory's .metaflow but read from the datastore's.
# Each pytest-xdist worker gets its own scratch: a worker inherits the environment of the
# controller, which imported this file first, so the folders the controller set are replaced
# (a user's own settings are kept): a worker that kept the controller's datastore wrote its
# cards under its own working directory and looked for them in the controller's folder.
_SCRATCH = Path(tempfile.mkdtemp(prefix="finetune-matrix-tests-"))
METAFLOW_ROOT = _SCRATCH / "metaflow"
METAFLOW_ROOT.mkdir()
_OWNED = "FINETUNE_MATRIX_TESTS_SET"  # the variables below that an earlier import of this file set
_owned = set(filter(None, os.environ.get(_OWNED, "").split(",")))
for _name, _value in {"METAFLOW_DATASTORE_SYSROOT_LOCAL": METAFLOW_ROOT,
                      # Random-init checkpoints the trainer writes for 4-bit and tensor-parallel loading.
                      "FINETUNE_MATRIX_CACHE": _SCRATCH / "cache",
                      # The launcher's CPU slots: a flow's cells share them; two workers do not (no
                      # test asserts a speed that the other worker's cells would change).
                      "FINETUNE_MATRIX_SLOTS_DIR": _SCRATCH / "slots",
                      # Flows plan from the catalog unless a test asks for the probe (tests/test_plan_time.py):
                      # probing every test matrix's shapes would add minutes to the suite.
                      "FINETUNE_MATRIX_PROBE": "0",
                      # Runs' folders and the calibration store they feed, for flows a test does not place.
                      "FINETUNE_MATRIX_REPORTS": _SCRATCH / "reports"}.items():
    if _name not in os.environ or _name in _owned:
        os.environ[_name] = str(_value)
        _owned.add(_name)
os.environ[_OWNED] = ",".join(sorted(_owned))
os.environ.setdefault("METAFLOW_USER", "tests")

# Ctrl-C works in the flows the tests start however the tests were started: a shell without job
# control starts a background command (`nohup make test &`, as a CI script may) with SIGINT
# ignored, every process it starts inherits that, and a Python that starts with SIGINT ignored
# never raises KeyboardInterrupt (the interrupt tests' flows then ran on through their SIGINT).
# A handler, unlike "ignored", is not inherited: the flows start with SIGINT at its default.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# `pytest -n N --dist loadfile --no-loadscope-reorder` (make test) hands each file whole to the
# next free worker, in collection order. The files that take minutes go first, longest first (as
# measured on a clean clone), so that the last files handed out are short ones and no worker is
# left running a long one alone at the end.
LONGEST_FIRST = ("test_start_checks.py", "test_plan_memory_cpu.py", "test_sagemaker.py", "test_slurm.py", "test_sweep.py",
                 "test_economy.py", "test_flow_failures.py", "test_track.py", "test_flow_parallel.py",
                 "test_strategies.py", "test_trainer_features.py", "test_plan_time.py", "test_preflight.py",
                 "test_launcher.py", "test_flow.py", "test_architectures.py", "test_live_card.py",
                 "test_gpu_evidence.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, as written


def interrupt(proc: subprocess.Popen, log: Path, how: str = "ctrl-c", timeout: float = 60) -> None:
    """Ctrl-C in the terminal (SIGINT to the flow's process group, started with
    start_new_session), or `sigterm` to the flow's runtime alone (as a scheduler stops it); the
    test fails, with the flow's log and its processes, if it has not ended within `timeout` s.
    The caller kills what is left of the group in its `finally`."""
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the flow did not end within {timeout:g} s of {how}: {log.read_text()[-3000:]}\n"
                    f"its processes:\n{processes_of(proc.pid)}")


def processes_of(session: int) -> str:
    """Each process of the flow's session: state, where it waits, its signal masks, CPU time and
    command (what a flow that does not act on a signal is doing)."""
    lines = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if os.getsid(int(status.parent.name)) != session:
                continue
            wchan = (status.parent / "wchan").read_text()
            cmd = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
            cpu = sum(map(int, (status.parent / "stat").read_text().rsplit(")", 1)[1].split()[11:13]))
        except (OSError, ValueError):
            continue
        lines.append(f"{status.parent.name} {fields.get('State', '?').strip()} wchan={wchan} "
                     f"blk={fields.get('SigBlk', '?').strip()} ign={fields.get('SigIgn', '?').strip()} "
                     f"cgt={fields.get('SigCgt', '?').strip()} cpu_ticks={cpu} nice={os.getpriority(os.PRIO_PROCESS, int(status.parent.name))} {cmd}")
    return "\n".join(sorted(lines)) + "\n" + subprocess.run(["uptime"], capture_output=True, text=True).stdout


def make_cell(**overrides) -> CellSpec:
    """A cell of the debug model that trains in a few seconds on CPU."""
    settings = {
        "model": "llama-debug", "peft": "lora", "strategy": "single", "nodes": 1, "gpus": 1,
        "lr": 1e-3, "micro_batch": 4, "grad_accum": 1, "precision": "fp32", "seq_len": 32,
        "train": {"max_steps": 6, "timing_warmup_steps": 1, "timeout_s": 300},
        "data": {"train_samples": 256, "val_samples": 32},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return CellSpec.model_validate({**settings, "cell_id": cell_id({**settings, "cell_id": ""})})


def subprocess_env() -> dict[str, str]:
    """The environment of a launched trainer: one thread per rank, this repo first on the path
    (packages already on PYTHONPATH, as on a machine with carried wheels, stay)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # `make test-gpu` gives ranks every core: GPU cells build large models on the CPU first.
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("FINETUNE_MATRIX_TEST_THREADS", "1"), "PYTHONPATH": path}


def torchrun_trainer(cell: CellSpec, out: Path, nproc: int | None = None, timeout: float = 300):
    """`torchrun --nproc_per_node N -m steps.train --cell CELL.yaml --out DIR`, for real."""
    out.mkdir(parents=True, exist_ok=True)
    cell_file = out / "cell.yaml"
    cell_file.write_text(yaml.safe_dump(cell.model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc or cell.gpus), "-m", "steps.train",
           "--cell", str(cell_file), "--out", str(out)]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    metrics = json.loads((out / "metrics.json").read_text())
    return proc, metrics


def torchrun_cells(cells: list[CellSpec], outs: list[Path], timeout: float = 600):
    """Cells of one world size trained one after the other by one torchrun launch
    (`tests/one_launch.py`, the trainer's own `main` per cell); the launch and each cell's metrics."""
    args = []
    for cell, out in zip(cells, outs, strict=True):
        out.mkdir(parents=True, exist_ok=True)
        (out / "cell.yaml").write_text(yaml.safe_dump(cell.model_dump(mode="json")))
        args += [str(out / "cell.yaml"), str(out)]
    (nproc,) = {cell.world_size for cell in cells}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "tests.one_launch", *args]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    found = [out / "metrics.json" for out in outs]
    return proc, [json.loads(f.read_text()) if f.exists() else {"outcome": None, "error": proc.stderr[-3000:]}
                  for f in found]


class OneLaunchPerWorldSize:
    """Named cells trained on first use, every cell of the same world size by one torchrun launch
    (`torchrun_cells`): the trainer's start-up (torch, transformers and PEFT imported: about
    10 s per process on a 2-core machine) is paid once per world size, not once per cell. Each
    cell still runs the trainer's own `main` into its own folder with its own metrics; peak
    memory is a per-process figure, so a test that asserts on it launches its cell alone."""

    def __init__(self, root: Path, cells: dict[str, CellSpec]):
        self.root, self.cells, self.done = root, cells, {}

    def __call__(self, name: str) -> tuple[subprocess.CompletedProcess, dict, Path]:
        """(the launch, the cell's metrics, its folder)."""
        if name not in self.done:
            size = self.cells[name].world_size
            todo = [n for n, c in self.cells.items() if c.world_size == size and n not in self.done]
            proc, found = torchrun_cells([self.cells[n] for n in todo], [self.root / n for n in todo])
            self.done.update({n: (proc, m, self.root / n) for n, m in zip(todo, found, strict=True)})
        return self.done[name]


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is absent (a user's fresh clone has none)")
    return SHARED / "data"
