"""The project's image for the tests: the CPU variant of the Containerfile on a local Debian base,
built once and kept in podman's storage under a name that is a hash of what goes into it.

`make image-base` builds the base with debootstrap from apt's Debian mirror (no image registry);
`make image BASE=<that base> TAG=<name>` builds the image (tests therefore build through the same
targets a user runs). The name is `localhost/finetune-matrix:cpu-<hash>`, the hash covering every
file the build reads (the Containerfile, .dockerignore, constraints.txt, setup.cfg, pyproject.toml,
README.md, steps/, configs/, flows/) and the torch wheel: an image of that name is this checkout's
image, so a second session (or a second test file) reuses it, and any change builds a new one
(podman's layer cache keeps that quick where only the code changed). Older `cpu-*` names are
removed after a build. A file lock serialises builds between pytest-xdist workers.

The builds need the package index (PyPI) and the Debian mirror, like `make setup`; nothing else does.

    tag = cpu_image()          # builds what is missing, else returns at once

`python -m tests.engines.image` does the same from a shell (CI can build before the tests run).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.engines import podman

REPO = Path(__file__).resolve().parents[2]
BASE = "localhost/finetune-matrix-base:bookworm"
REPOSITORY = "localhost/finetune-matrix"
# What the Containerfile copies (with .dockerignore's exclusions) and what decides how.
BUILD_FILES = ("Containerfile", ".dockerignore", "constraints.txt", "setup.cfg", "pyproject.toml", "README.md")
BUILD_DIRS = ("steps", "configs", "flows")
SKIPPED = ("__pycache__", ".metaflow")
LOCK = Path(tempfile.gettempdir()) / "finetune-matrix-image-build.lock"
# Seconds each build took in this process (absent: it was already there).
timings: dict[str, float] = {}


def torch_version() -> str:
    """TORCH_VERSION of the Makefile: the torch the image's CPU wheel is."""
    match = re.search(r"^TORCH_VERSION \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert match, "no TORCH_VERSION in the Makefile"
    return match.group(1)


def torch_wheel() -> Path | None:
    """The CPU wheel of TORCH_VERSION for the base's Python (3.11, Debian bookworm's) on this
    machine, in pip's find-links folders (PIP_FIND_LINKS); None: `make image` downloads it."""
    name = f"torch-{torch_version()}+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    for folder in os.environ.get("PIP_FIND_LINKS", "").split() + ["/opt/wheels"]:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def build_inputs() -> list[Path]:
    files = [REPO / name for name in BUILD_FILES]
    for folder in BUILD_DIRS:
        files += [p for p in (REPO / folder).rglob("*")
                  if p.is_file() and not any(part in SKIPPED for part in p.parts) and p.suffix != ".pyc"]
    return sorted(files)


def content_hash() -> str:
    """sha256 of every file the build reads (path and content) and of the torch wheel (its name
    and size: its content is fixed by its name), 16 hex digits."""
    digest = hashlib.sha256()
    for path in build_inputs():
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    wheel = torch_wheel()
    digest.update(f"{wheel.name}:{wheel.stat().st_size}".encode() if wheel else f"torch=={torch_version()}+cpu".encode())
    return digest.hexdigest()[:16]


def tag() -> str:
    return f"{REPOSITORY}:cpu-{content_hash()}"


def missing() -> str | None:
    """Why the CPU image cannot be built or found here (None: it can)."""
    why = podman.missing()
    if why:
        return why
    if shutil.which("make") is None:
        return "`make` is not installed"
    if not podman.image_exists(BASE):
        if shutil.which("debootstrap") is None:
            return "`debootstrap` is not installed (apt-get install debootstrap), and the local base image is absent"
        if os.geteuid() != 0:
            return "debootstrap needs root to build the local base image"
    return None


def _make(*args: str, timeout: float) -> float:
    start = time.monotonic()
    proc = subprocess.run(["make", *args], cwd=REPO, env=podman.env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"make {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - start


def base_image() -> str:
    """The local Debian base (`make image-base`), built if absent."""
    if not podman.image_exists(BASE):
        timings["base"] = _make("image-base", timeout=900)
    return BASE


def built() -> str:
    """This checkout's CPU image, for a test: the tests never build it (the build reaches the package
    index and the Debian mirror, and a test sends nothing beyond loopback), they skip without it."""
    import pytest

    why = missing()
    if why:
        pytest.skip(why)
    name = tag()
    if not podman.image_exists(name):
        pytest.skip(f"the CPU image {name} is not built: `make test-containers` builds it before its tests "
                    f"(or `python -m tests.engines.image`)")
    return name


def cpu_image() -> str:
    """This checkout's CPU image (`make image BASE=<local base>`), built if absent; its name."""
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        name = tag()
        if podman.image_exists(name):
            return name
        base_image()
        wheel = torch_wheel()
        timings["image"] = _make("image", f"BASE={BASE}", f"TAG={name}",
                                 *([f"TORCH_WHEEL={wheel}"] if wheel else []), timeout=2400)
        _remove_older(name)
        return name


def _remove_older(keep: str) -> None:
    """Untag this repository's other cpu-* images (their layers stay while another image uses them)."""
    out = podman.podman("images", "--format", "{{.Repository}}:{{.Tag}}", REPOSITORY, check=False).stdout.split()
    old = [ref for ref in out if ref.startswith(f"{REPOSITORY}:cpu-") and ref != keep]
    if old:
        podman.podman("rmi", *old, check=False)


if __name__ == "__main__":  # `python -m tests.engines.image`: build what is missing before the tests run
    why = missing()
    if why:
        raise SystemExit(f"cannot build the CPU image here: {why}")
    name = cpu_image()
    done = ", ".join(f"{what} built in {s:.0f} s" for what, s in timings.items()) or "already built"
    print(f"{name} ({done})")
