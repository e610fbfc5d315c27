"""`make gpu-evidence`: every GPU number from one prepared command, inside one short GPU spell.

Four parts, each a process with its own time limit, run one after the other (`parts.py`); each
writes its own file under `reports/benchmarks/<date>-<gpu>/` as it goes, so a part that runs out
of time keeps what it finished and the parts after it still run. `summary.md` says on one page
what came out (`summary.py`). `--dry-run` (`make gpu-evidence DRY=1`) checks on any machine every
command line, file and import the parts would use, and runs none of them.

Standard library only: it runs before the environment is set up, on a bare GPU machine
(`environment.py` builds it there from a wheelhouse carried beside the checkout).
"""
