"""`python -m steps.report.evidence [--dry-run]` (`make gpu-evidence [DRY=1]`): see `__init__.py`."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from steps.report.evidence import environment, run, summary
from steps.report.evidence.parts import BUDGET_S, PARTS, REPO

GPU_PYTHON = "3.12"  # the CUDA PyTorch image's (the device machines': Python 3.12.3)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")


def pins() -> dict[str, str]:
    """constraints.txt's versions, by normalised name."""
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip()):
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def wheel_requirements() -> list[str]:
    """environment.WHEELS at this checkout's pins (constraints.txt; Liger Kernel's own)."""
    versions = {**pins(), "liger-kernel": environment.LIGER_VERSION}
    unpinned = [w for w in environment.WHEELS if w.lower().replace("_", "-") not in versions]
    if unpinned:
        raise SystemExit(f"no pinned version of {', '.join(unpinned)} in constraints.txt")
    return [f"{w}=={versions[w.lower().replace('_', '-')]}" for w in environment.WHEELS]


def download_wheels(dest: Path, python_version: str) -> int:
    """The wheels of environment.WHEELS for the GPU machine's Python, at this checkout's pins."""
    wanted = wheel_requirements()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(dest),
           *wanted]
    print(" ".join(cmd))
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()  # the budget counts building the environment too
    parser = argparse.ArgumentParser(description="every GPU number from one command (make gpu-evidence)")
    parser.add_argument("--dry-run", action="store_true", help="check every command line, file and import; run nothing")
    parser.add_argument("--out", default=str(REPO / "reports" / "benchmarks"), help="results go to OUT/<date>-<gpu>/")
    parser.add_argument("--wheels", default=str(REPO / "wheelhouse"), help="wheels for a bare GPU machine")
    parser.add_argument("--python", help="the interpreter the parts run with (default: found or built)")
    parser.add_argument("--only", help="comma-separated parts: " + ", ".join(p.name for p in PARTS))
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="all parts together (default 9 minutes)")
    parser.add_argument("--download-wheels", metavar="DIR", help="download the wheels a bare GPU machine lacks")
    parser.add_argument("--gpu-python", default=GPU_PYTHON, help="the GPU machine's Python version, for the wheels")
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels), args.gpu_python)
    only = [p for p in (args.only or "").split(",") if p]
    if unknown := sorted(set(only) - {p.name for p in PARTS}):
        parser.error(f"--only: no part {', '.join(unknown)}; the parts are {', '.join(p.name for p in PARTS)}")
    gpu = run.gpu_name()
    if gpu is None and not args.dry_run:
        print("no GPU: nvidia-smi finds none (make gpu-evidence DRY=1 checks the command on any machine)")
        return 2
    if args.dry_run:
        print("wheels for a bare GPU machine (make gpu-wheels): " + " ".join(wheel_requirements()))
    python, problems = environment.python_for(Path(args.wheels), args.python, args.dry_run)
    if problems:
        print("\n".join(problems))
        return 2
    out = run.out_folder(Path(args.out), gpu, args.dry_run)
    print(f"python: {python}\nresults: {out}")
    statuses = run.run_all(python, out, args.dry_run, args.budget_s - (time.monotonic() - started), only)
    page = summary.build(out, statuses, gpu, args.dry_run)
    print(page)
    failed = [s["part"] for s in statuses if s["outcome"] != "ok"]
    if failed:
        print(f"not ok: {', '.join(failed)} (logs in {out})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
