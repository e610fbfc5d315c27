"""A remote node's folder comes back with its task: under `compute: batch` or `kubernetes` the
container that trained a cell is gone when its task ends, so the train task keeps the folder
(cell file, metrics, log, adapter) as an artifact and `gather` unpacks it into the run's folder."""

from __future__ import annotations

import io
import tarfile

from steps.flow import tasks
from tests.conftest import make_cell


def _write(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"contents of {name}\n")


def test_a_remote_node_folder_round_trips_without_checkpoints_or_working_files(tmp_path):
    cell = make_cell().model_dump()
    remote, here = tmp_path / "container", tmp_path / "reports"
    out = tasks.node_dir(remote, make_cell(), 0)
    _write(out, ["cell.yaml", "metrics.json", "train.log", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "checkpoints/step-4/rank0.pt", "heartbeat/rank0",
                 "partial.jsonl", ".running", "node1/train.log"])
    blob = tasks.node_files({"compute": "batch"}, remote, cell, 0)
    names = sorted(tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz").getnames())
    assert names == ["adapter", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "cell.yaml",
                     "metrics.json", "train.log"]
    assert tasks.node_files({"compute": "local"}, remote, cell, 0) is None  # the folder is already here
    assert tasks.node_files({"compute": "kubernetes"}, tmp_path / "nothing", cell, 0) is None

    kept = tasks.node_dir(here, make_cell(), 0)
    kept.mkdir(parents=True)
    (kept / "train.log").write_text("written here\n")  # what the run folder has already is kept as it is
    tasks.keep_node_files(here, cell, [(0, blob), (1, None)])
    got = sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file())
    assert got == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "cell.yaml",
                   "metrics.json", "train.log"]
    assert (kept / "adapter" / "adapter_model.safetensors").read_text() == "contents of adapter/adapter_model.safetensors\n"
    assert (kept / "train.log").read_text() == "written here\n"
