"""finetune-matrix: the code the flow's steps call, and the trainer they launch."""

import importlib.util
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"


def plain(matrix: Any) -> dict[str, Any]:
    """A matrix as plain dicts and lists (Metaflow hands Config values over as ConfigValue)."""
    return matrix.to_dict() if hasattr(matrix, "to_dict") else dict(matrix)


def library_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """Each installed distribution's version, None for one that is not installed."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def reports_root() -> Path:
    """Where runs' folders and the calibration store they feed go (`FINETUNE_MATRIX_REPORTS`)."""
    return Path(os.environ.get("FINETUNE_MATRIX_REPORTS", REPO_ROOT / "reports")).resolve()


def cache_root() -> Path:
    """This machine's caches: random-init checkpoints, the probe's answers (`FINETUNE_MATRIX_CACHE`)."""
    return Path(os.environ.get("FINETUNE_MATRIX_CACHE", Path.home() / ".cache" / "finetune-matrix"))


def git_commit() -> str | None:
    """The checkout's commit (None without git or outside a clone, as in a remote image)."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def lazy_module(name: str) -> ModuleType:
    """`name`, imported when one of its attributes is first read (the standard library's
    LazyLoader recipe); an already imported module as it is."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
