"""The flow's own work yields the CPU to the cells it measures.

On a machine whose cores the cells hold (`cpu_slots`), Metaflow's other tasks (a finished cell's
`gather`, `launch`, `join`, `end`) and every card process (each refresh of a live card
starts one or two Python processes of about half a second of CPU) used to run beside a cell's
ranks at the same priority: on 2 cores a DDP cell that started as two single cells ended stepped
0.028 s, or 0.041 s with their cards and gathers beside it (run to run, the plan's "second run
within 10%" was lost in it). Here those processes run at a lower priority (`nice`): they still
run, in the moments the cells leave free, and the ranks (and Metaflow's runtime that starts the
`train` tasks) keep theirs. The `train` task itself keeps its priority until its trainer has
exited (its ranks inherit it); its live card redraws from a thread of low priority.
"""

from __future__ import annotations

import os
import sys
import threading

# How far below the cells the flow's own work runs (0: beside them, as before). At 10 a
# bookkeeping process on a core that a rank holds gets about a tenth of it (CFS weights 110
# against 1024), so a card of a second still renders within Metaflow's 45 s card timeout while
# a cell trains; at 19 it would get 1.5% and could time out.
NICE = int(os.environ.get("FINETUNE_MATRIX_FLOW_NICE", "10"))


CELL_STEPS = ("start", "train")  # `start` probes this machine's cells: it measures as they will run


def is_bookkeeping(argv: list[str]) -> bool:
    """A Metaflow task of any step but `start` and `train` (`... step gather --run-id ...`), or
    a card process (`... card create ...`); not the runtime (`run`, `resume`), which starts the
    `train` tasks, nor `card server` and the other commands a user types."""
    if "step" in argv:
        at = argv.index("step")
        return at + 1 < len(argv) and argv[at + 1] not in CELL_STEPS
    return "card" in argv and "create" in argv[argv.index("card"):]


def lower(thread_only: bool = False) -> None:
    """Lower this process's priority (`thread_only`: only the calling thread's, and so the
    processes it starts; Linux keeps a priority per thread) to `NICE` below normal. Never
    raises it again, and never fails the step."""
    if NICE <= 0:
        return
    if thread_only and not sys.platform.startswith("linux"):
        return  # elsewhere a thread has no priority of its own: leave the process as it is
    who = threading.get_native_id() if thread_only else 0
    try:
        now = os.getpriority(os.PRIO_PROCESS, who)
        if now < NICE:
            os.setpriority(os.PRIO_PROCESS, who, NICE)
    except OSError:
        pass


def for_this_process(argv: list[str]) -> None:
    """Called first thing in the flow's file: bookkeeping processes yield to the cells."""
    if is_bookkeeping(argv):
        lower()
