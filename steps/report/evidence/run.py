"""Run the parts one after the other, each in its own process group under its time limit and
what is left of the whole budget; keep each part's file as it ends (or as it was when stopped)."""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from steps.report.evidence.parts import BUDGET_S, PARTS, REPO, Part

LOG_TAIL = 4000


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi ("NVIDIA H100 80GB HBM3"), None without one."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = proc.stdout.strip().splitlines() if proc.returncode == 0 else []
    return names[0].strip() if names else None


def out_folder(root: Path, gpu: str | None, dry: bool) -> Path:
    """reports/benchmarks/<date>-<gpu>/: h100, h200, a100, ...; `dry-run` in a dry run."""
    date = datetime.date.today().isoformat()
    short = "dry-run" if dry else (gpu or "no-gpu").replace("NVIDIA ", "").split()[0].lower()
    return Path(root) / f"{date}-{short}"


def _env(part: Part, out: Path) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    env.update({k: v.format(out=out) for k, v in part.env})
    return env


def run_part(part: Part, python: str, out: Path, limit_s: float, dry: bool, echo=print) -> dict:
    """One part under its limit: its outcome (ok, failed, timeout), seconds, and log's tail (the
    whole log in <part>.log)."""
    argv = part.argv(python, out, dry)
    echo(f"== {part.name} ({'check' if dry else f'limit {limit_s:.0f} s'}): {' '.join(argv[1:])}")
    log_path = out / f"{part.name}{'.check' if dry else ''}.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, cwd=REPO, env=_env(part, out), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit_s)
            outcome = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the part and every process it started
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code, outcome = None, "timeout"
    seconds = time.monotonic() - t0
    tail = log_path.read_text(errors="replace")[-LOG_TAIL:]
    echo(f"   {outcome} in {seconds:.0f} s")
    return {"part": part.name, "outcome": outcome, "exit_code": code, "seconds": round(seconds, 1),
            "limit_s": round(min(limit_s, part.limit_s)), "log": log_path.name, "log_tail": tail}


def junit_to_json(xml_path: Path) -> dict:
    """pytest's JUnit XML as {passed, failed, skipped, tests: [...]} (what tests.json keeps)."""
    if not xml_path.exists():
        return {"finished": False, "tests": []}
    tests = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or "")[:500]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    return {"finished": True, **counts, "tests": tests}


def finish_part(part: Part, python: str, out: Path, status: dict) -> None:
    """What a part leaves beside its log: tests.json from the JUnit XML, flow.json from the run's
    folder (scored by `steps.report.evidence.flow_scores`); the bench parts write theirs as they go."""
    target = out / part.output
    if part.name == "tests":
        target.write_text(json.dumps({**junit_to_json(out / "tests.xml"), "status": status}, indent=2))
    elif part.name == "flow":
        subprocess.run([python, "-m", "steps.report.evidence.flow_scores", str(out / "flow-runs"), str(target)],
                       cwd=REPO, env=_env(part, out), capture_output=True, text=True, timeout=300)
        record = json.loads(target.read_text()) if target.exists() else {"finished": False}
        target.write_text(json.dumps({**record, "status": status}, indent=2, default=str))
    else:
        record = json.loads(target.read_text()) if target.exists() else {"parts": {}}
        target.write_text(json.dumps({**record, "status": status}, indent=2, default=str))


def run_all(python: str, out: Path, dry: bool, budget_s: float = BUDGET_S, only: list[str] | None = None,
            echo=print) -> list[dict]:
    """Every part in order, each under min(its limit, what is left of `budget_s`)."""
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget_s
    statuses = []
    for part in PARTS:
        if only and part.name not in only:
            continue
        left = deadline - time.monotonic()
        if not dry and left < 20:
            statuses.append({"part": part.name, "outcome": "not run", "seconds": 0, "limit_s": 0,
                             "log_tail": f"the budget of {budget_s:.0f} s was spent"})
            continue
        status = run_part(part, python, out, 600 if dry else min(part.limit_s, left), dry, echo)
        if not dry:
            finish_part(part, python, out, status)
        statuses.append(status)
    return statuses
