"""`python -m steps.plan X.yaml`: what each cell of a matrix will hold, take and cost."""

import sys

from steps.plan.cli import main

if __name__ == "__main__":
    sys.exit(main())
