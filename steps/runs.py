"""What each step of the flow does, as plain functions (the flow file only wires them)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd

from steps import REPO_ROOT, catalog, launcher, report, results
from steps.matrix import expand, parse_matrix
from steps.metrics import versions
from steps.schema import CellSpec

DEFAULT_MATRIX = REPO_ROOT / "configs" / "matrix" / "default.yaml"


def reports_root() -> Path:
    return Path(os.environ.get("FINETUNE_MATRIX_REPORTS", REPO_ROOT / "reports")).resolve()


def run_dir(run_id: str) -> Path:
    """reports/<run id>/: run ids are unique, so a run never writes into another's folder."""
    return reports_root() / str(run_id)


def plan(matrix: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell of the matrix (refused ones included: they become `skipped` rows)."""
    return [p.to_dict() for p in expand(parse_matrix(dict(matrix)))]


def train_cell(planned: dict[str, Any], out_root: Path) -> dict[str, Any]:
    cell = CellSpec.model_validate(planned["cell"])
    if planned["refused"]:
        return launcher.skipped_metrics(cell, planned["refused"])
    m = launcher.run_cell(cell, Path(out_root) / "cells" / cell.cell_id)
    instance = catalog.instances()[cell.instance]
    m["cost_usd"] = m["wall_s"] / 3600 * instance.price_per_hour_usd * cell.nodes
    return m


def provenance(run_id: str, flow: str, matrix: dict[str, Any]) -> dict[str, Any]:
    blob = json.dumps(dict(matrix), sort_keys=True, default=str).encode()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"run_id": run_id, "flow": flow, "matrix": matrix.get("name", ""),
            "matrix_sha256": hashlib.sha256(blob).hexdigest(), "git_commit": commit,
            "versions": versions()}


def join(run_id: str, records: list[tuple[dict, dict]], out_dir: Path,
         meta: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, str]]:
    df = results.build_table(run_id, records)
    paths = results.write(df, out_dir)
    (out_dir / "provenance.json").write_text(json.dumps(meta, indent=2))
    paths["report"] = report.write(df, out_dir, meta)
    return df, {k: str(v) for k, v in paths.items()}
