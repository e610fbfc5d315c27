"""Is the trainer fast? `python -m steps.bench` (see `steps/trainer/bench/`)."""

import sys

from steps.trainer.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
