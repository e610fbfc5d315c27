"""The Python the parts run with, and on a bare GPU machine without internet, building it.

A CUDA PyTorch image (the GPU machine's `python3`) lacks what the flow and the trainer add:
Metaflow, pydantic, bitsandbytes, Liger Kernel. `make gpu-wheels`, on a machine with internet,
downloads their wheels for the GPU machine's Python into `wheelhouse/` (`WHEELS`); copied
beside the checkout, `make gpu-evidence` installs them with no index into `.venv-gpu`, a
virtual environment that sees the image's own packages (its CUDA torch above all).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
GPU_VENV = REPO / ".venv-gpu"
# What a CUDA PyTorch image lacks (pinned by constraints.txt; Liger Kernel, a GPU-only fast
# path, here). Installed without their dependencies: the image has them (Metaflow's boto3 is
# used only for S3, which the evidence never touches).
WHEELS = ("metaflow", "pydantic", "pydantic_core", "annotated-types", "typing-inspection", "bitsandbytes",
          "liger-kernel")
LIGER_VERSION = "0.8.5"
# What the parts import, checked before anything runs.
NEEDED = ("torch", "transformers", "peft", "bitsandbytes", "metaflow", "pydantic", "pandas", "pyarrow", "yaml",
          "rich", "matplotlib", "pytest", "accelerate")


def _imports(python: str, modules: tuple[str, ...]) -> list[str]:
    """The modules `python` cannot import."""
    code = ("import importlib.util, sys; print(','.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    try:
        proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, cwd=REPO)
    except OSError:  # no such interpreter
        return list(modules)
    return [m for m in proc.stdout.strip().split(",") if m] if proc.returncode == 0 else list(modules)


def wheel_names(folder: Path) -> set[str]:
    """Distribution names of the wheels in `folder`, normalised as pip does."""
    return {p.name.split("-")[0].lower().replace("_", "-") for p in Path(folder).glob("*.whl")}


def missing_wheels(folder: Path) -> list[str]:
    have = wheel_names(folder)
    return [w for w in WHEELS if w.lower().replace("_", "-") not in have]


def python_for(wheels: Path, python: str | None, dry: bool, echo=print) -> tuple[str, list[str]]:
    """(the interpreter the parts run with, problems). In order: `python` if given; this
    checkout's `.venv` or `.venv-gpu` where it imports everything; else `.venv-gpu` built from
    `wheels` over the running interpreter's packages (not in a dry run: there the wheelhouse's
    contents are checked)."""
    candidates = [python] if python else [str(REPO / ".venv" / "bin" / "python"), str(GPU_VENV / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).exists() and not _imports(candidate, NEEDED):
            return candidate, []
    if python:
        return python, [f"{python} cannot import {', '.join(_imports(python, NEEDED))}"]
    if not Path(wheels).is_dir():
        return sys.executable, [f"no environment imports {', '.join(NEEDED)}, and no wheelhouse at {wheels} to "
                                f"build one from (make gpu-wheels, on a machine with internet)"]
    if missing := missing_wheels(wheels):
        return sys.executable, [f"{wheels} lacks wheels of {', '.join(missing)} (make gpu-wheels)"]
    if dry:
        return sys.executable, []
    echo(f"building {GPU_VENV} from {wheels} over {sys.executable}'s packages")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(GPU_VENV)], check=True)
    gpu_python = str(GPU_VENV / "bin" / "python")
    subprocess.run([gpu_python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links", str(wheels),
                    *WHEELS], check=True)
    if still := _imports(gpu_python, NEEDED):
        return gpu_python, [f"{GPU_VENV} still cannot import {', '.join(still)}: add their wheels to {wheels}"]
    return gpu_python, []
