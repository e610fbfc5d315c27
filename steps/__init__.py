"""finetune-matrix: the code the flow's steps call, and the trainer they launch."""

import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"


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
