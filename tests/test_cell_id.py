"""Cell ids: the same settings give the same id in every run and on every machine."""

from __future__ import annotations

from steps.plan.matrix import cell_id, expand, load_matrix, parse_matrix
from tests.conftest import REPO

BASE = {"model": "llama-debug", "peft": "lora", "strategy": "ddp", "gpus": 2, "lr": 1e-3,
        "micro_batch": 4, "seq_len": 64}


def test_ids_are_pinned():
    # Pinned: a change here breaks joins of old and new runs by cell_id.
    assert cell_id(BASE) == "llama-debug-lora-ddp-1x2-0a76785405"
    ids = [p.cell.cell_id for p in expand(load_matrix(REPO / "configs/matrix/default.yaml"))]
    assert ids == ["llama-debug-lora-single-1x1-87a519f56c", "llama-debug-lora-single-1x1-efe689ecbb",
                   "llama-debug-lora-ddp-1x2-1204bf0c1c", "llama-debug-lora-ddp-1x2-907e88f1b8"]


def test_same_settings_same_id_whatever_the_spelling():
    reordered = dict(reversed(list(BASE.items())))
    assert cell_id(reordered) == cell_id(BASE)
    assert cell_id({**BASE, "lr": 0.001}) == cell_id({**BASE, "lr": 1.0e-3})
    assert cell_id({**BASE, "train": {"seed": 0}}) == cell_id(BASE)  # a default written out
    assert cell_id({**BASE, "instance": "local-cpu", "nodes": 1}) == cell_id(BASE)


def test_settings_that_change_the_measurement_change_the_id():
    base = cell_id(BASE)
    for change in ({"lr": 2e-3}, {"micro_batch": 8}, {"strategy": "single", "gpus": 1},
                   {"train": {"max_steps": 21}}, {"data": {"train_samples": 100}},
                   {"train": {"lora": {"r": 16}}}, {"precision": "bf16-mixed"}):
        assert cell_id({**BASE, **change}) != base, change


def test_run_limits_do_not_change_the_id():
    assert cell_id({**BASE, "train": {"timeout_s": 5}}) == cell_id(BASE)


def test_single_ignores_gpu_axis_and_duplicates_merge():
    spec = parse_matrix({"name": "x", "models": "llama-debug", "peft": "lora",
                         "strategy": ["single", "ddp"], "gpus": [1, 2], "lr": 1e-3})
    cells = [p.cell for p in expand(spec)]
    assert [(c.strategy, c.gpus) for c in cells] == [("single", 1), ("ddp", 1), ("ddp", 2)]
    assert len({c.cell_id for c in cells}) == 3
