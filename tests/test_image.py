"""The image (Containerfile) for real: its CPU variant built from a local Debian base with `make
image-base` and `make image` (tests/engines/image.py: once, kept under a hash of what goes in), then
a cell's trainer run inside it by hand, without Metaflow, with no network, writing metrics.json to
a mounted folder, and the losses compared with the same cell run here with the venv's torchrun.

Same torch build (2.13.0+cpu) in both, one thread per rank, the same seeds: the losses agree to
1e-6 relative (they come out bit for bit equal). The ZeRO cells also check the Containerfile's
decision to prebuild no DeepSpeed op: no op is compiled at start, in the image (which has no
compiler) nor here (which has one, so an op DeepSpeed wanted would be built, and found).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import make_cell, torchrun_cells
from tests.engines import image, podman

pytestmark = [pytest.mark.slow, pytest.mark.containers]

REL = 1e-6  # same torch, same seeds, one thread per rank
USER, UID = "finetune", 10001  # the Containerfile's
APP = "/opt/finetune-matrix"
# The DDP cell of tests/test_trainer.py, and the ZeRO cells DeepSpeed's ops would matter to.
CELLS = {s: make_cell(strategy=s, gpus=2, micro_batch=2, train={"max_steps": 8}) for s in ("ddp", "zero2", "zero3_offload")}
DDP = CELLS["ddp"]
# What DeepSpeed prints when it compiles or loads one of its C++/CUDA ops.
OP_BUILD_LINES = ("Building extension module", "Loading extension module", "ninja", "op_builder")


@pytest.fixture(scope="session")
def cpu_image() -> str:
    return image.built()  # built before the tests (`make test-containers`), never by them


def run_in(ref: str, command: str, out: Path | None = None, timeout: float = 600, **env: str):
    """`bash -c COMMAND` in a container of `ref` with no network (loopback only), `out` mounted at
    /out; removed when it ends (and if it outlives `timeout`)."""
    name = f"fm-test-image-{uuid.uuid4().hex[:8]}"
    args = ["run", "--rm", "--name", name, "--label", f"{podman.LABEL}=image", "--network=none"]
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o777)  # the image's user is not this machine's
        args += ["-v", f"{out}:/out"]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    try:
        return podman.podman(*args, ref, "bash", "-c", command, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        podman.remove_containers([name])
        raise


def write_cell(cell, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cell.yaml").write_text(yaml.safe_dump(cell.model_dump(mode="json")))


def torchrun(cell_dir: str) -> str:
    return (f"torchrun --standalone --nproc_per_node 2 -m steps.train --cell {cell_dir}/cell.yaml "
            f"--out {cell_dir} > {cell_dir}/train.log 2>&1")


def losses(m: dict) -> list[float]:
    return [p["loss"] for p in m["loss_curve"]]


def test_the_image_runs_as_its_non_root_user_with_the_project_and_no_reports_or_venv(cpu_image):
    config = podman.image_inspect(cpu_image)["Config"]
    assert config["User"] == str(UID) and config["WorkingDir"] == f"/home/{USER}"
    facts = r"""
import json, os, shutil, subprocess, sys, torch, steps
found = subprocess.run(["find", "/", "-xdev", "(", "-name", ".venv", "-o", "-name", ".git", "-o", "-name", "wheelhouse",
                        "-o", "-name", "reports", "-o", "-name", "tests", ")", "-not", "-path", "*/site-packages/*",
                        "-not", "-path", "/usr/*"], capture_output=True, text=True).stdout.split()
print(json.dumps({"uid": os.getuid(), "cwd": os.getcwd(), "python": shutil.which("python"), "exe": sys.executable,
                  "torch": torch.__version__, "steps": steps.__file__, "configs": str(steps.CONFIGS_DIR),
                  "app": sorted(os.listdir("/opt/finetune-matrix")), "found": found,
                  "tools": {t: shutil.which(t) for t in ("bash", "tar", "gzip", "date", "torchrun")},
                  "skip_install": os.environ.get("METAFLOW_SKIP_INSTALL_DEPENDENCIES")}))
"""
    proc = run_in(cpu_image, f"python -c {shlex.quote(facts)} 2>/dev/null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["uid"] == UID and got["cwd"] == f"/home/{USER}"
    # `python` is the environment with everything; torch is this machine's build
    assert got["python"] == "/opt/venv/bin/python" and got["exe"] == "/opt/venv/bin/python"
    assert got["torch"] == torch.__version__ == "2.13.0+cpu"
    # the checkout's code and configs, from the image; nothing of reports, venvs, tests or git
    assert got["steps"] == f"{APP}/steps/__init__.py" and got["configs"] == f"{APP}/configs"
    assert got["app"] == ["README.md", "configs", "constraints.txt", "flows", "pyproject.toml", "setup.cfg",
                          "steps", "torch-constraint.txt"]
    assert got["found"] == []
    # what Metaflow's Batch and Kubernetes tasks call before the step (bash -c, date, tar -xzf;
    # boto3 through python) and the pip install they skip
    assert all(got["tools"].values()), got["tools"]
    assert got["skip_install"] == "1"


@pytest.fixture(scope="module")
def in_image(cpu_image, tmp_path_factory):
    """The three cells trained by hand in one container of the image, one torchrun each, with
    DeepSpeed's op folder (TORCH_EXTENSIONS_DIR) in the mounted folder: (the run, the folder)."""
    out = tmp_path_factory.mktemp("image")
    for name, cell in CELLS.items():
        write_cell(cell, out / name)
        os.chmod(out / name, 0o777)
    command = " && ".join(torchrun(f"/out/{name}") for name in CELLS)
    command += "; rc=$?; echo compilers: $(command -v c++ g++ gcc cc nvcc); exit $rc"
    proc = run_in(cpu_image, command, out=out, OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR="/out/torch_extensions")
    return proc, out


@pytest.fixture(scope="module")
def here(cpu_image, tmp_path_factory):
    """The same cells here with the venv's torchrun (one launch, each cell through the trainer's
    main), DeepSpeed's op folder an empty one of ours: (the launch, each cell's metrics, the folders)."""
    root = tmp_path_factory.mktemp("host")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))
        proc, found = torchrun_cells(list(CELLS.values()), [root / name for name in CELLS])
    return proc, dict(zip(CELLS, found, strict=True)), root


def test_a_ddp_cell_trains_in_the_image_without_network_as_it_does_here(in_image, here):
    proc, out = in_image
    log = (out / "ddp" / "train.log").read_text()
    assert proc.returncode == 0, log[-3000:] + proc.stderr[-2000:]
    m = json.loads((out / "ddp" / "metrics.json").read_text())
    assert m["outcome"] == "ok" and m["error"] is None, m["error"]
    assert m["cell_id"] == DDP.cell_id and m["world_size"] == 2 and m["global_batch"] == 4
    assert [p["step"] for p in m["loss_curve"]] == list(range(1, 9))
    assert "step 8/8" in log
    # written by the image's user into the mounted folder
    assert (out / "ddp" / "metrics.json").stat().st_uid == UID

    host_proc, found, root = here
    assert host_proc.returncode == 0, host_proc.stderr[-3000:]
    assert found["ddp"]["outcome"] == "ok"
    assert losses(m) == pytest.approx(losses(found["ddp"]), rel=REL)
    assert m["val_loss"] == pytest.approx(found["ddp"]["val_loss"], rel=REL)
    # the trainer's own files (its heartbeats and partial curve too: the launcher, not here, tidies them)
    written = ["adapter", "cell.yaml", "heartbeat", "metrics.json", "partial.jsonl"]
    assert sorted(p.name for p in (root / "ddp").iterdir()) == written
    assert sorted(p.name for p in (out / "ddp").iterdir()) == sorted([*written, "train.log"])
    assert sorted(p.name for p in (out / "ddp" / "adapter").iterdir()) == \
        sorted(p.name for p in (root / "ddp" / "adapter").iterdir())


def test_deepspeed_cells_compile_no_op_at_start_in_the_image_or_here(in_image, here):
    """The Containerfile builds DeepSpeed with DS_BUILD_OPS=0: a ZeRO-2 and a ZeRO-3 offload cell
    then load no DeepSpeed op, here (with a compiler) as in the image (without one)."""
    proc, out = in_image
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip() == "compilers:"  # so an op built at start would have failed the cell
    host_proc, found, root = here
    assert host_proc.returncode == 0, host_proc.stderr[-3000:]
    for name in ("zero2", "zero3_offload"):
        m = json.loads((out / name / "metrics.json").read_text())
        assert m["outcome"] == "ok" and found[name]["outcome"] == "ok", (m["error"], found[name]["error"])
        assert m["cell_id"] == CELLS[name].cell_id
        assert losses(m) == pytest.approx(losses(found[name]), rel=REL), name
        log = (out / name / "train.log").read_text()
        assert not [line for line in log.splitlines() if any(s in line for s in OP_BUILD_LINES)], name
    assert not (out / "torch_extensions").exists()
    assert not (root / "torch_extensions").exists()
    assert not [line for line in host_proc.stdout.splitlines() + host_proc.stderr.splitlines()
                if any(s in line for s in OP_BUILD_LINES)]
