"""What a train step does around a job it submitted and follows (SageMaker, Slurm)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable


@contextlib.contextmanager
def stop_job_on_exit(holder: dict[str, str], key: str, stop: Callable[[str], None]):
    """SIGTERM (Metaflow stopping a task, a timeout) and Ctrl-C end the step through an
    exception; on the way out `stop` is called with the job in `holder[key]`, if there is one
    still (the step clears it once the job has ended). SIGKILL cannot be caught: the job's own
    limit then bounds it."""

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if holder.get(key):
            stop(holder[key])
