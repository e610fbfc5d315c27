"""torchrun's (and DeepSpeed's) entry point for the trainer: one cell file in, metrics.json out.

    torchrun --nproc_per_node N -m steps.train --cell CELL.yaml --out DIR [--resume]

The trainer itself is `steps/trainer/`; this module only starts it.
"""

import os
import sys

from steps.trainer.main import main

if __name__ == "__main__":
    code = main()
    # Everything is written: skip the interpreter's teardown of torch and friends (about a
    # second per process, paid by every cell).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
