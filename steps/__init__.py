"""finetune-matrix: the code the flow's steps call, and the trainer they launch."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIGS_DIR = REPO_ROOT / "configs"
