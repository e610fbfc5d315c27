"""Host names `algo-1` .. `algo-N` for multi-host training jobs run on this one machine.

SageMaker names the instances of a job `algo-1`, `algo-2`, ... and the SDK's drivers hard-code
`SM_MASTER_ADDR=algo-1`. Here every "instance" is a process group on this machine, so those
names must resolve to the loopback address: when they do not, one line is appended to
/etc/hosts (when it is writable), marked with MARK, and exactly the lines appended are removed
again by `restore()`. The file is rewritten in place (never renamed over), since containers
often bind-mount it.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

MARK = "# finetune-matrix local SageMaker"
HOSTS = Path("/etc/hosts")


def host_names(count: int) -> list[str]:
    return [f"algo-{i + 1}" for i in range(count)]


def resolvable(names: list[str]) -> bool:
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            return False
    return True


def multi_host_supported() -> bool:
    """Whether jobs with InstanceCount > 1 can run here (algo-N resolve, or /etc/hosts writable)."""
    return resolvable(host_names(2)) or os.access(HOSTS, os.W_OK)


class HostsFile:
    """The lines this process appended to /etc/hosts, to take out again."""

    def __init__(self, path: Path = HOSTS):
        self.path = path
        self.added: list[str] = []
        self._lock = threading.Lock()

    def ensure(self, count: int) -> str | None:
        """Make algo-1..algo-<count> resolve; the reason why not, or None."""
        names = host_names(count)
        with self._lock:
            if resolvable(names):
                return None
            if not os.access(self.path, os.W_OK):
                return (
                    f"ClientError: the local SageMaker emulator runs the {count} instances of this job as "
                    f"processes on one machine, reached as {', '.join(names)}; those names do not resolve "
                    f"and {self.path} is not writable, so they cannot be mapped to 127.0.0.1. "
                    "Run the tests as a user that may write /etc/hosts, or with those names resolving."
                )
            line = f"127.0.0.1 {' '.join(names)}  {MARK}"
            text = self.path.read_text()
            with open(self.path, "a") as f:
                f.write(("" if not text or text.endswith("\n") else "\n") + line + "\n")
            self.added.append(line)
            if not resolvable(names):
                return f"ClientError: appended {line!r} to {self.path}, but {', '.join(names)} still do not resolve"
            return None

    def restore(self) -> None:
        """Remove exactly the lines appended by `ensure` (one occurrence each)."""
        with self._lock:
            if not self.added:
                return
            lines = self.path.read_text().splitlines(keepends=True)
            for added in self.added:
                for i, line in enumerate(lines):
                    if line.rstrip("\n") == added:
                        del lines[i]
                        break
            with open(self.path, "w") as f:  # in place: /etc/hosts may be a bind mount
                f.write("".join(lines))
            self.added.clear()
