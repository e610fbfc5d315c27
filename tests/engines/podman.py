"""podman for the tests: its settings (containers.conf beside this file), a runner, its Docker API
service on a socket, and the containers a test made, listed and removed.

podman reads CONTAINERS_CONF: runc, cgroupfs and ulimits within the machine's hard limits (with
podman's defaults crun fails on `setrlimit RLIMIT_NOFILE` where the open-files hard limit is low,
and on hybrid cgroups). Images live in podman's default storage, so that the image built once
(tests/engines/image.py) is there for every test and for the Docker API service.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONF = HERE / "containers.conf"
# Every container a test starts carries this label, so that what a test leaves is found and removed.
LABEL = "finetune-matrix-test"


def missing() -> str | None:
    """Why podman cannot run containers here (None: it can)."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install podman runc ...)"
    return None


def env(conf: Path | None = None, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment of a podman command: `base` (default: this process's) with CONTAINERS_CONF."""
    return {**(os.environ if base is None else base), "CONTAINERS_CONF": str(conf or CONF), **extra}


def write_conf(path: Path, engine: Mapping[str, str] | None = None, base: Path = CONF) -> Path:
    """A containers.conf at `path`: the project's with more `[engine]` settings (values as TOML
    strings), e.g. {"events_logger": "file", "events_logfile_path": "/tmp/x/events.log"}."""
    lines = base.read_text().splitlines()
    ours = [f"{key} = {json.dumps(value)}" for key, value in (engine or {}).items()]
    if "[engine]" in (line.strip() for line in lines):
        at = next(i for i, line in enumerate(lines) if line.strip() == "[engine]") + 1
        lines[at:at] = ours
    else:
        lines += ["", "[engine]", *ours]
    path.write_text("\n".join(lines) + "\n")
    return path


def podman(*args: str, conf: Path | None = None, check: bool = True, timeout: float = 600,
           input: str | None = None, env_extra: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`podman ARGS...` with the project's settings; its output captured as text. `check`: a
    non-zero exit raises, with podman's own message."""
    proc = subprocess.run(["podman", *args], env=env(conf, **(env_extra or {})), capture_output=True, text=True,
                          timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... exited {proc.returncode}: "
                           f"{proc.stderr.strip()[-3000:] or proc.stdout.strip()[-3000:]}")
    return proc


def image_exists(ref: str, conf: Path | None = None) -> bool:
    return podman("image", "exists", ref, conf=conf, check=False).returncode == 0


def image_inspect(ref: str, conf: Path | None = None) -> dict[str, Any]:
    return json.loads(podman("image", "inspect", ref, conf=conf).stdout)[0]


def containers(label: str = LABEL, conf: Path | None = None) -> list[dict[str, Any]]:
    """Containers with `label` in podman's storage, running or not (podman's JSON records)."""
    out = podman("ps", "-a", "--filter", f"label={label}", "--format", "json", conf=conf).stdout
    return json.loads(out or "[]")


def remove_containers(ids: Sequence[str], conf: Path | None = None) -> None:
    """Remove these containers (names or ids), stopping the running ones at once."""
    if ids:
        podman("rm", "-f", "-t", "0", *ids, conf=conf, check=False)


class Service:
    """`podman system service` on a unix socket: podman's Docker API (`DOCKER_HOST=unix://SOCKET`).

    `popen` starts the process (default subprocess.Popen; a network namespace's own launcher
    where the service must run inside one); it is stopped by its process id on `close()`.

        with Service(tmp / "podman.sock") as svc:
            env = {**os.environ, "DOCKER_HOST": svc.url}
    """

    def __init__(self, socket: Path, conf: Path | None = None, log: Path | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        self.socket, self.conf, self.popen = Path(socket), conf, popen
        self.log = Path(log) if log else self.socket.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 60) -> Service:
        with open(self.log, "w") as log:
            self.proc = self.popen(["podman", "system", "service", "--time=0", self.url], env=env(self.conf),
                                   stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"podman system service exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if self.ping():
                return self
            time.sleep(0.1)
        self.close()
        raise RuntimeError(f"podman's socket did not answer within {timeout:.0f} s: {self.log.read_text()[-3000:]}")

    def ping(self) -> bool:
        """The Docker API's `GET /_ping` on the socket answers OK."""
        import socket as sockets

        if not self.socket.exists():
            return False
        try:
            with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
                return b"OK" in s.recv(4096)
        except OSError:
            return False

    def close(self) -> None:
        """Stop the service by its process id (TERM, then KILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
