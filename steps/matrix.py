"""List a matrix's cells, their ids and what is refused: `python -m steps.matrix X.yaml`."""

import sys

from steps.plan.matrix import main

if __name__ == "__main__":
    sys.exit(main())
