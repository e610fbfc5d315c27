"""What every run taught the planner, kept per device model: each finished run adds its measured
cells (settings, what they measured, the probe entry they were planned with), and the planner
fits its calibration from them by default (`steps.estimate.calibrate`); no torch.

Two places, read together: the runs of this checkout, `<reports>/calibration/<device>.jsonl`
(the reports folder, `FINETUNE_MATRIX_REPORTS`), and the entries shipped with the code,
`configs/calibration/<device>.jsonl` (the H100 from the measured bench runs), so that GPU
predictions start from measurement.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steps import REPO_ROOT, reports_root
from steps.estimate import calibrate
from steps.plan.settings import contended, leaf_paths

if TYPE_CHECKING:
    import pandas as pd

SHIPPED = REPO_ROOT / "configs" / "calibration"
MEASURED = ("outcome", "step_s", "tokens_per_s", "overhead_s", "eval_s", "wall_s", "ran_wall_s", "cost_usd",
            "ran_cost_usd", "train_steps", "quality_from", "peak_mem_gb", "runtime_baseline_gb", "ended_at",
            "started_at", "run_id", "cell_id", "other_cpu_share")


def root() -> Path:
    return reports_root() / "calibration"


def slug(device: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower() or "unknown"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def entries_of(df: pd.DataFrame, probes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One store entry per measured cell of a results table; a cell that ran on a busy machine
    (`settings.contended`) is left out: its times measured the other work as much as the cell."""
    keep = [*calibrate.TOP, *leaf_paths(), *MEASURED]
    out = []
    for cell, row in calibrate.measured(df):
        device = calibrate.device_model(cell)
        if device != "cpu" and str(row.get("device") or "").lower().startswith("cpu"):
            continue  # a GPU instance type that found no GPU trained on the CPU: not its GPU's timings
        if contended(row.get("other_cpu_share")):
            continue
        entry = {k: _plain(row.get(k)) for k in keep if k in row}
        out.append({"device": device, "row": entry, "probe": (probes or {}).get(row["cell_id"])})
    return out


def add_run(df: pd.DataFrame, probes: dict[str, Any] | None = None, folder: Path | None = None) -> int:
    """Append a run's measured cells to the store (once: a run already kept is replaced)."""
    entries = entries_of(df, probes)
    folder = folder or root()
    folder.mkdir(parents=True, exist_ok=True)
    runs = {str(e["row"].get("run_id")) for e in entries}
    for device in {e["device"] for e in entries}:
        path = folder / f"{slug(device)}.jsonl"
        kept = [e for e in _read(path) if str(e["row"].get("run_id")) not in runs]
        mine = [e for e in entries if e["device"] == device]
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(e, default=str) + "\n" for e in kept + mine))
        tmp.replace(path)
    return len(entries)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash: the others still count
    return out


def load(folders: list[Path] | None = None) -> list[dict[str, Any]]:
    """Every entry of the store: this checkout's runs, then the shipped ones."""
    entries = []
    for folder in folders if folders is not None else [root(), SHIPPED]:
        for path in sorted(Path(folder).glob("*.jsonl")):
            entries.extend(_read(path)[-RECENT:])
    return entries


RECENT = 120  # entries per device the fit reads, the latest (a plan refits them: about a second)


def records(entries: list[dict[str, Any]]) -> list[calibrate.Record]:
    """The entries as the calibration fits them (pandas not needed: the flow's start plans)."""
    out = []
    for e in entries:
        try:
            rec = calibrate.record_of(e["row"], e.get("probe"), e["row"].get("run_id"))
        except (ValueError, KeyError):
            continue  # settings this version no longer accepts
        if rec is not None:
            out.append(rec)
    return out


def calibration(folders: list[Path] | None = None) -> calibrate.Calibration | None:
    """The calibration of everything the store holds; None where it holds nothing."""
    recs = records(load(folders))
    return calibrate.fit(recs) if recs else None
