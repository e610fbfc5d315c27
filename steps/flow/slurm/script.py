"""The batch script of a cell's Slurm job: resources from the matrix's `remote:` and the instance
catalog, then one launcher per node under `srun` (torchrun or DeepSpeed's on that node's
devices), meeting at the first node's address as torchrun's Slurm recipe does. Pure: no Slurm
is needed to write it, so the multi-node script is checked on paper (tests/test_slurm.py)."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path
from typing import Any

from steps import REPO_ROOT
from steps.flow.compute import MEMORY_SHARE
from steps.plan import catalog
from steps.plan.schema import CellSpec

NOT_SHARED = 97  # the exit code of a job that cannot see its cell folder
IMAGE_ROOT = "/opt/finetune-matrix"  # where the project's image (Containerfile) keeps the code
PORT_BASE, PORT_SPAN = 20000, 20000  # the rendezvous port: one per job id, the same on every node


def time_limit_s(cell: CellSpec, remote: dict[str, Any]) -> int:
    """The job's --time: the cell's own limit (which ends it `timeout` with its curve) plus what
    starting may take; `remote.time_limit_s` where given."""
    return int(remote.get("time_limit_s") or int(cell.train.timeout_s) + int(remote.get("startup_allowance_s", 1800)))


def slurm_time(seconds: int) -> str:
    """--time as minutes:seconds (Slurm reads "M:SS" as minutes and seconds)."""
    return f"{seconds // 60}:{seconds % 60:02d}"


def resources(cell: CellSpec, remote: dict[str, Any]) -> dict[str, str]:
    """sbatch's resource options for one cell: whole nodes' worth of the instance type."""
    instance = catalog.instances().get(cell.instance)
    local = instance is None or instance.local
    gres = remote.get("gres") or (None if local else "gpu:{gpus}")
    if remote.get("cpus_per_node"):
        cpus = int(remote["cpus_per_node"])
    elif local:  # CPU processes stand in for devices: their cores
        cpus = cell.gpus * ((instance.cores_per_device if instance else None) or 1)
    else:
        cpus = instance.vcpus
    memory = remote.get("mem_gb") or (instance.memory_gb * MEMORY_SHARE if instance and instance.memory_gb else None)
    options = {"nodes": str(cell.nodes), "ntasks-per-node": "1"}
    if cpus:
        options["cpus-per-task"] = str(cpus)
    if gres:
        options["gres"] = gres.format(gpus=cell.gpus)
    if memory:
        options["mem"] = f"{math.floor(memory * 1024)}M"
    return options


def options(cell: CellSpec, remote: dict[str, Any], out_dir: Path) -> list[str]:
    """Every #SBATCH option of the cell's job, in order: name, resources, limit, where it runs
    (partition, account, qos), its output file, no requeue, then the matrix's own lines."""
    named = {"job-name": f"fm-{cell.cell_id}", **resources(cell, remote),
             "time": slurm_time(time_limit_s(cell, remote))}
    for key in ("partition", "account", "qos"):
        if remote.get(key):
            named[key] = str(remote[key])
    named["output"] = str(Path(out_dir) / "slurm-%j.out")
    # A job its node failed under ends NODE_FAIL and the flow retries the cell (a new attempt,
    # from its checkpoint): requeued by Slurm, it would run again under the same attempt.
    return [f"--{k}={v}" for k, v in named.items()] + ["--no-requeue"] + list(remote.get("sbatch") or [])


def node_command(cell_file: Path, out_dir: Path, remote: dict[str, Any], cpus: str | None) -> str:
    """The step every node runs: this project's node entry, in the image where there is one."""
    step = ["srun", "--nodes=$SLURM_JOB_NUM_NODES", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *([f"--cpus-per-task={cpus}"] if cpus else [])]  # srun does not inherit it (Slurm >= 22.05)
    entry = ["-m", "steps.flow.slurm.entry", "--cell", str(cell_file), "--out", str(out_dir)]
    folder = shlex.quote(str(Path(out_dir).parent.parent))  # the run's folder, into the container
    image, container = remote.get("image"), remote.get("container")
    if image and container == "pyxis":
        step += [f"--container-image={shlex.quote(image)}", f"--container-mounts={folder}:{folder}",
                 f"--container-workdir={IMAGE_ROOT}"]
        return " ".join(step + ["python"] + [shlex.quote(a) for a in entry])
    if image and container == "apptainer":
        runner = ["apptainer", "exec", "--nv", "--bind", folder, "--pwd", IMAGE_ROOT, shlex.quote(image), "python"]
        return " ".join(step + runner + [shlex.quote(a) for a in entry])
    # Without a setting: the flow's own interpreter (a venv on the shared filesystem), or the
    # `python` of the environment the `setup` lines made (a module, a conda or venv activate).
    python = remote.get("python") or ("python" if remote.get("setup") else sys.executable)
    return " ".join(step + [shlex.quote(python)] + [shlex.quote(a) for a in entry])


def job_script(cell: CellSpec, remote: dict[str, Any], out_dir: Path, root: Path = REPO_ROOT) -> str:
    """The whole batch script (bash)."""
    out_dir = Path(out_dir)
    cell_file = out_dir / "cell.yaml"
    opts = options(cell, remote, out_dir)
    cpus = next((o.split("=", 1)[1] for o in opts if o.startswith("--cpus-per-task=")), None)
    lines = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts),
             f"# finetune-matrix cell {cell.cell_id}: {cell.nodes} node(s) x {cell.gpus} process(es)",
             "set -eo pipefail",
             "# The flow wrote the cell's folder on the machine that submitted this job: the nodes must share it.",
             f"if [ ! -f {shlex.quote(str(cell_file))} ]; then",
             f"  echo \"finetune-matrix: {cell_file} is not on this node ($(hostname)): the run's folder must be on "
             f"a filesystem the submitting machine and the nodes share (FINETUNE_MATRIX_REPORTS)\" >&2",
             f"  exit {NOT_SHARED}",
             "fi",
             *(remote.get("setup") or []),
             *([] if remote.get("image") else [f"cd {shlex.quote(str(root))}"]),
             "# torchrun's rendezvous on the first node of the allocation",
             "export MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
             f"export MASTER_PORT=$(( {PORT_BASE} + SLURM_JOB_ID % {PORT_SPAN} ))",
             node_command(cell_file, out_dir, remote, cpus)]
    return "\n".join(lines) + "\n"
