"""A network namespace for one test session: loopback up and no route out.

What runs inside it (moto's server, podman's service and the containers it starts with the host's
network, the flow and Metaflow's Batch code) can reach only this namespace's own addresses: a
connection to the EC2 instance-metadata address (169.254.169.254) or to any public address fails
at once with "Network is unreachable", and no packet leaves the machine.

    with NetNS() as ns:
        proc = ns.popen(["python", "-m", "moto.server", "-p", "5000"])
        ns.call(lambda: boto3.client("s3", endpoint_url=...).list_buckets())

Processes start with `nsenter --net=/run/netns/NAME` (not `ip netns exec`, which mounts a
sysfs of its own where runc then finds no cgroup mount). `call` runs Python callables in a thread
of this process that entered the namespace (setns): sockets opened there belong to the namespace.
Everything started is stopped by its process id, and the namespace is deleted, on `close`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# Both ends of the veth pair stay inside the namespace (only for a tool that refuses loopback).
VETH_ADDRESSES = ("10.213.7.1/30", "10.213.7.2/30")


def missing() -> str | None:
    """Why no namespace can be made here (None: it can)."""
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    if os.geteuid() != 0:
        return "making a network namespace needs root (CAP_SYS_ADMIN)"
    return None


def _setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetNS:
    """A namespace `fm-test-<pid>-<random>`; `veth=True` adds a veth pair with both ends inside."""

    def __init__(self, veth: bool = False, prefix: str = "fm-test"):
        self.name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.path = NETNS_DIR / self.name
        self.veth = veth
        self.addresses: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self._thread: ThreadPoolExecutor | None = None

    # ---- lifetime
    def create(self) -> NetNS:
        why = missing()
        if why:
            raise RuntimeError(why)
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            if self.veth:
                a, b = f"fmv{uuid.uuid4().hex[:6]}a", f"fmv{uuid.uuid4().hex[:6]}b"
                _ip("-n", self.name, "link", "add", a, "type", "veth", "peer", "name", b)
                for dev, address in zip((a, b), VETH_ADDRESSES, strict=True):
                    _ip("-n", self.name, "addr", "add", address, "dev", dev)
                    _ip("-n", self.name, "link", "set", dev, "up")
                self.addresses = [address.split("/")[0] for address in VETH_ADDRESSES]
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop every process started here (its process group, by the id it was started with),
        then the thread, then delete the namespace."""
        for proc in reversed(self.procs):
            stop(proc)
        self.procs.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self.path.exists():
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)

    def __enter__(self) -> NetNS:
        return self.create()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- inside
    def command(self, cmd: list[str]) -> list[str]:
        """`cmd` as run inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen:
        """Start `cmd` inside, in a process group of its own (stopped on `close`, or by `stop`)."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(cmd), **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
        """Run `cmd` inside to its end (no process is left behind: it is waited for)."""
        return subprocess.run(self.command(cmd), **kwargs)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in this process's thread inside the namespace; its result."""
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=self.name,
                                              initializer=_setns, initargs=(str(self.path),))
        return self._thread.submit(fn, *args, **kwargs).result()


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> int | None:
    """SIGTERM to the process group `proc` leads (by its id), SIGKILL after `grace_s`; its code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    else:  # the leader is gone: what it left in its group goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


def connect_error(host: str, port: int, timeout_s: float = 3.0) -> tuple[str | None, float]:
    """Try a TCP connection from here; (the error's name or None if it connected, seconds taken)."""
    import errno
    import socket

    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None, time.monotonic() - started
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        return name, time.monotonic() - started


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
