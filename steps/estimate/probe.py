"""This machine measured, not assumed: the planner's side of the probe (`steps.trainer.probe`
times the cells in a subprocess, so that planning imports no torch). Answers are cached per
machine and library versions, so a second plan of the same shapes costs nothing.

A local cell's probe entry holds its step time as a line in the number of decoder layers
(`step_base_s + layers * step_layer_s`), an evaluation forward per micro-batch likewise, the
model's build, the data's real tokens per row, and the trainer's import time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from steps import REPO_ROOT, cache_root, library_versions
from steps.plan import catalog
from steps.plan.schema import CellSpec

LIBRARIES = ("torch", "transformers", "peft", "deepspeed", "bitsandbytes")
VERSION = 3  # what the probe measures and how: a change invalidates every cached answer


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def machine() -> dict[str, Any]:
    """What the answers depend on: the CPU, its cores, the GPUs, and the libraries' versions."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpus": [name for name, _ in catalog.local_gpus()],
            "python": platform.python_version(), "versions": library_versions(LIBRARIES), "probe": VERSION}


def machine_key(info: dict[str, Any] | None = None) -> str:
    return hashlib.sha256(json.dumps(info or machine(), sort_keys=True).encode()).hexdigest()[:16]


def probed(cell: CellSpec) -> bool:
    """Cells whose device is here: the local CPU types and `local-gpu`."""
    entry = catalog.instances().get(cell.instance)
    return entry is not None and (entry.local or entry.local_gpu)


# A model of up to this many parameters is timed at its own depth (beside a one-layer cut):
# extrapolated from cuts of one and two layers, the twins' 8-layer cells ran about 1.35x their
# plan, those of 2 layers (timed whole) about 1.0x. Timed whole, those of studies 1-3 came to
# 0.9-1.3x (study 4's stayed 1.2-1.7x: not understood yet). Larger models are cut, and the
# calibration learns their extrapolation apart (`planner.CellPlan.depth`).
WHOLE_PARAMS = {"cpu": 150e6, "gpu": 1.5e9}


def depths(cell: CellSpec, facts: dict[str, Any] | None = None) -> tuple[int, int]:
    """The two depths the probe times the cell's model at: one layer (per pipeline stage) and
    two, or the model's own depth where it is small enough to time whole."""
    from steps.estimate import params, planner, step_time

    first, second = step_time.cuts(cell)
    arch = planner.arch_of(cell, facts)
    if arch is not None:
        layers = int(arch.get("num_hidden_layers") or 0)
        total = params.counts(arch, cell.peft, cell.train.lora.r, cell.train.lora.target_modules).total
        if layers > second and total <= WHOLE_PARAMS[catalog.device_kind(cell.instance)]:
            return first, layers
    return first, second


def request(cell: CellSpec, copies: int, facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the probe times for `cell`; `copies`: single-process cells run side by side."""
    from steps.estimate import step_time

    timed = step_time.timed(cell)
    entry = catalog.instances()[cell.instance]
    per = entry.cores_per_device or 1
    cores = [list(range(i * per, (i + 1) * per)) for i in range(max(1, (os.cpu_count() or 1) // per))]
    body = {"cell": timed.model_dump(mode="json", exclude={"cell_id", "repeat", "track", "track_context"}),
            "device": catalog.device_kind(cell.instance), "threads": per,
            "copies": copies if cell.world_size == 1 else 1, "cores": cores, "layers": list(depths(cell, facts))}
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:20]  # the shape, not the id
    return {"key": key, **body, "cell": {**body["cell"], "cell_id": cell.cell_id}}


def startup_request(cell: CellSpec) -> dict[str, Any]:
    modules = ["steps.trainer.main", "transformers.models.auto", "peft"]
    if cell.layout.deepspeed:
        modules.append("deepspeed")
    if cell.peft == "qlora":
        modules.append("bitsandbytes")
    return {"key": "startup:" + ",".join(modules), "modules": modules}


def _cache_file() -> Path:
    return cache_root() / "probe" / f"{machine_key()}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def copies_of(cells: list[CellSpec]) -> int:
    """How many single-process cells of this machine run side by side: each holds its cores."""
    local = [c for c in cells if probed(c) and catalog.device_kind(c.instance) == "cpu"]
    if not local:
        return 1
    per = max(catalog.instances()[c.instance].cores_per_device or 1 for c in local)
    return max(1, min(len(local), (os.cpu_count() or 1) // per))


def profile(cells: list[CellSpec], echo=print, facts: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per cell id, the probe's answers for the cells of this machine (measured once per machine,
    library versions and shape; later plans read the cache). `facts`: the models' facts, for
    the shapes of models that are not presets."""
    copies = copies_of(cells)
    wanted: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for cell in cells:
        if probed(cell):
            wanted[cell.cell_id] = (request(cell, copies, facts), startup_request(cell))
    if not wanted:
        return {}
    path = _cache_file()
    cache = _read_cache(path)
    steps = {r["key"]: r for r, _ in wanted.values() if r["key"] not in cache}
    starts = {s["key"]: s for _, s in wanted.values() if s["key"] not in cache}
    if steps or starts:
        echo(f"probing this machine: {len(steps)} cell shapes, {len(starts)} start-ups (cached in {path})")
        answers = _run({"step": list(steps.values()), "startup": list(starts.values())})
        cache.update(answers)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        kept = {k: v for k, v in answers.items() if not v.get("error")}  # a failure is tried again next time
        tmp.write_text(json.dumps({**_read_cache(path), **kept}, indent=1))
        tmp.replace(path)
    out = {}
    for cell_id, (step_req, start_req) in wanted.items():
        step, start = cache.get(step_req["key"], {}), cache.get(start_req["key"], {})
        errors = [e for e in (step.get("error"), start.get("error")) if e]
        out[cell_id] = {"error": "; ".join(errors)} if errors else {
            **{k: v for k, v in step.items() if k != "kind"}, "import_s": start.get("import_s"),
            "copies": step_req["copies"], "layers": step_req["layers"], "machine": machine_key()}
    return out


def _run(requests: dict[str, list]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ask, answer = Path(tmp) / "requests.json", Path(tmp) / "answers.json"
        ask.write_text(json.dumps(requests))
        # The launcher's allocator setting for local CPU cells (the user's own wins): the probe
        # must pay for each step's fresh mappings as the cells do.
        env = {**catalog.CPU_MALLOC_ENV, **os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-m", "steps.trainer.probe", str(ask), str(answer)],
                              cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0 or not answer.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            error = "the probe failed: " + " | ".join(tail)
            return {r["key"]: {"error": error} for items in requests.values() for r in items}
        return json.loads(answer.read_text())


def probe_runs(folders: list[Path], echo=print) -> list[Path]:
    """Each run folder's measured cells probed on this machine, written beside its results as
    `probe.json` (what the study twins keep: the held-out tests plan them with it)."""
    import datetime

    import pandas as pd

    from steps.estimate import calibrate

    written = []
    for folder in folders:
        cells = [r.cell for r in calibrate.records(pd.read_parquet(folder / "results.parquet"))]
        echo(f"{folder.name}: {len(cells)} measured cells")
        entries = profile(cells, echo=echo)
        failed = sorted(k for k, v in entries.items() if v.get("error"))
        if failed:
            echo(f"{folder.name}: {len(failed)} probes failed, {folder / 'probe.json'} kept as it was: "
                 + entries[failed[0]]["error"])
            continue
        out = folder / "probe.json"
        out.write_text(json.dumps({"machine": {k: v for k, v in machine().items() if k != "probe"},
                                   "probe": VERSION, "measured": datetime.date.today().isoformat(),
                                   "cells": entries}, indent=1, sort_keys=True) + "\n")
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m steps.estimate.probe",
                                     description="Probe the measured cells of run folders on this machine and "
                                                 "write each folder's probe.json (the study twins').")
    parser.add_argument("folders", nargs="+", type=Path, help="run folders holding results.parquet")
    args = parser.parse_args(argv)
    probe_runs(args.folders)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
