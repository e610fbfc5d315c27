"""Is the trainer fast? `python -m steps.bench` (see `steps/trainer/bench.py`)."""

import sys

from steps.trainer.bench import main

if __name__ == "__main__":
    sys.exit(main())
