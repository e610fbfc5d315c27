"""`python -m steps.report RESULTS [RESULTS ...] --out DIR`: the report from results tables."""

import sys

from steps.report.build import main

sys.exit(main())
