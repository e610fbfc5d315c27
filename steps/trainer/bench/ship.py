"""The calibration store's shipped entries (`configs/calibration/`), from the saved GPU bench
runs in `reports/benchmarks/`, so that GPU predictions start from measurement:

    python -m steps.trainer.bench.ship
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from steps import REPO_ROOT
from steps.estimate import calibrate, store
from steps.plan.settings import leaf_paths
from steps.trainer.bench.gpu import bench_cell

BENCH_INSTANCE = "p5.48xlarge"  # the catalog's H100 type: what a bench run on one H100 is planned as


def _flat(settings: dict[str, Any]) -> dict[str, Any]:
    out = {k: settings[k] for k in calibrate.TOP if k in settings}
    for path in leaf_paths():
        node: Any = settings
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[path] = json.dumps(node) if isinstance(node, (list, dict)) else node
    return out


def bench_entries(path: Path) -> list[dict[str, Any]]:
    """Store entries from a saved GPU bench (`reports/benchmarks/*-bench-gpu-*.json`): each of
    the trainer's runs that finished, as the cell it ran on one GPU of the catalog's type."""
    record = json.loads(Path(path).read_text())
    out = []
    for part in record.get("parts", {}).values():
        for run in part.get("runs", []):
            if not run.get("label", "").startswith("trainer") or run.get("outcome") != "ok":
                continue
            fast = "no fast paths" not in run["label"]
            settings = bench_cell("tinyllama-1.1b", "lora", int(run["micro_batch"]), fast, 30, 5)
            settings.update(instance=BENCH_INSTANCE, nodes=1, gpus=1)
            row = {**_flat(settings), "cell_id": settings["cell_id"], "outcome": "ok", "step_s": run["step_s"],
                   "tokens_per_s": run["tokens_per_s"], "peak_mem_gb": run.get("peak_mem_gb"),
                   "run_id": Path(path).stem, "ended_at": record.get("date"), "bench_label": run["label"],
                   "bench_device": record.get("device")}
            cell = calibrate.cell_of_row(row)
            out.append({"device": calibrate.device_model(cell), "row": row, "probe": None})
    return out


def ship(bench_files: list[Path], folder: Path = store.SHIPPED) -> list[Path]:
    """The shipped store: one file per device model, from the saved bench runs."""
    entries = [e for f in sorted(bench_files) for e in bench_entries(f)]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for device in sorted({e["device"] for e in entries}):
        path = folder / f"{store.slug(device)}.jsonl"
        path.write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in entries if e["device"] == device))
        written.append(path)
    return written


BENCH_GLOB = "*-bench-gpu-*.json"

if __name__ == "__main__":  # python -m steps.trainer.bench.ship: the shipped entries, from reports/benchmarks/
    for written in ship(list((REPO_ROOT / "reports" / "benchmarks").glob(BENCH_GLOB))):
        print(written)
