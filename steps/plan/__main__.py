"""`python -m steps.plan X.yaml`: the pre-launch plan, what each cell of a matrix will hold,
take and cost (the estimator's command line, `steps.estimate.cli`, under the name users know)."""

import sys

from steps.estimate.cli import main

if __name__ == "__main__":
    sys.exit(main())
