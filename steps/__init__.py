"""finetune-matrix: the code the flow's steps call, and the trainer they launch."""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"


def reports_root() -> Path:
    """Where runs' folders and the calibration store they feed go (`FINETUNE_MATRIX_REPORTS`)."""
    return Path(os.environ.get("FINETUNE_MATRIX_REPORTS", REPO_ROOT / "reports")).resolve()


def cache_root() -> Path:
    """This machine's caches: random-init checkpoints, the probe's answers (`FINETUNE_MATRIX_CACHE`)."""
    return Path(os.environ.get("FINETUNE_MATRIX_CACHE", Path.home() / ".cache" / "finetune-matrix"))
