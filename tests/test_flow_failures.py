"""Failures in a real matrix run: OOM and hang are results, a real error fails its branch, and
`resume` re-runs only that cell (or `on_error: record` keeps it as a row)."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import METAFLOW_ROOT
from tests.test_flow import FLOW

pytestmark = pytest.mark.slow


# The three failing cells and one that finishes (the other four add nothing to these checks).
FOUR = [{"strategy": "ddp", "micro_batch": 4}, {"strategy": "single", "micro_batch": 2}]


def _four(outcomes: dict[tuple, str]) -> dict[tuple, str]:
    return {k: v for k, v in outcomes.items()
            if not (k[0] == "ddp" and k[2] == 4) and not (k[0] == "single" and k[2] == 2)}


def save_model(folder, weights: bool = True) -> None:
    """A small Llama saved as a Hugging Face folder; without `weights`, its weights file is not one
    (a download cut short): its config reads, so the checks before launch let it through (they do
    not load weights), and the trainer finds out."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if not weights:
        (folder / "model.safetensors").write_bytes(b"not a safetensors file")


def failing_matrix(tmp_path, **extra) -> dict:
    """8 cells (`exclude=FOUR` keeps 4); three forced to fail: one OOMs, one hangs (rank 1 stops at step 3, rank 0 waits
    in its all-reduce), one loads a model folder whose weights file is broken."""
    data = tmp_path / "model"
    save_model(data, weights=False)
    return {
        "name": "failures", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"],
        "gpus": 2, "lr": [3e-3, 1e-2], "micro_batch": [2, 4], "seq_len": 256,
        "train": {"max_steps": 6, "timing_warmup_steps": 1, "timeout_s": 300, "save_adapter": False},
        "data": {"train_samples": 128, "val_samples": 16},
        "retries": 1,
        "include": [
            {"strategy": "single", "lr": 3e-3, "micro_batch": 4,
             "train": {"fault": {"kind": "oom", "at_step": 3}}},
            {"strategy": "ddp", "lr": 1e-2, "micro_batch": 2,
             "train": {"fault": {"kind": "hang", "at_step": 3, "rank": 1}, "hang_after_s": 8}},
            {"strategy": "single", "lr": 1e-2, "micro_batch": 4, "models": str(data)},
        ],
        **extra,
        # That cell replaces the debug model's at its point of the grid.
        "exclude": [*extra.get("exclude", []),
                    {"models": ["llama-debug"], "strategy": ["single"], "lr": [1e-2], "micro_batch": [4]}],
    }, data


def _runner(tmp_path, matrix: dict | None):
    """A Runner for `run` (with the matrix) or for `resume` (the origin run's matrix)."""
    from metaflow import Runner

    env = {"FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    if matrix is None:
        return Runner(FLOW, show_output=False, env=env, cwd=str(METAFLOW_ROOT))
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return Runner(FLOW, show_output=False, env=env, cwd=str(METAFLOW_ROOT), config=[("matrix", str(path))])


def _outcomes(df) -> dict[tuple, str]:
    return {(r.strategy, r.lr, r.micro_batch): r.outcome for r in df.itertuples()}


def _expected(raising: str) -> dict[tuple, str]:
    out = {(s, lr, mb): "ok" for s in ("single", "ddp") for lr in (3e-3, 1e-2) for mb in (2, 4)}
    out[("single", 3e-3, 4)] = "oom"
    out[("ddp", 1e-2, 2)] = "hang"
    out[("single", 1e-2, 4)] = raising
    return out


def test_only_the_raising_cell_fails_and_resume_reruns_it_alone(tmp_path):
    from metaflow import Run, namespace

    namespace(None)
    matrix, data = failing_matrix(tmp_path, exclude=FOUR)
    with _runner(tmp_path, matrix) as runner:
        first = runner.run(max_workers=8)
        output = first.stdout + first.stderr
        assert first.status == "failed", output[-3000:]
        run = Run(first.run.pathspec)
        trains = list(run["train"])
        failed = [t for t in trains if not t.successful]
        assert len(failed) == 1, output[-3000:]
        assert failed[0]["cell"].data["model"] == str(data)
        assert "Error while deserializing header" in failed[0]["metrics"].data["error"]
        assert failed[0].current_attempt == 1  # retried once (retries: 1), then failed the run
        done = {t["cell"].data["cell_id"]: t.pathspec for t in trains if t.successful}
        assert len(done) == 3, "the cells running beside the failing one were stopped"
        outcomes = {t["metrics"].data["outcome"] for t in trains if t.successful}
        assert outcomes == {"ok", "oom", "hang"}

        hung = next(t for t in trains if t.successful and t["metrics"].data["outcome"] == "hang")
        hm = hung["metrics"].data
        assert hm["stopped_after_steps"] == 2 and [p["step"] for p in hm["loss_curve"]] == [1, 2]
        assert "hang_after_s=8" in hm["error"]
        assert "(most recent call first)" in hung["log"].data and "in inject_fault" in hung["log"].data  # stacks dumped

    save_model(data)  # the cause, removed
    with _runner(tmp_path, None) as runner:
        second = runner.resume(origin_run_id=run.id, max_workers=8)
        assert second.status == "successful", (second.stdout + second.stderr)[-3000:]

    resumed = Run(second.run.pathspec)
    trains = list(resumed["train"])
    rerun = [t for t in trains if t.origin_pathspec is None]
    assert [t["cell"].data["model"] for t in rerun] == [str(data)]
    cloned = {t["cell"].data["cell_id"]: t.origin_pathspec for t in trains if t.origin_pathspec}
    assert cloned == done
    df = resumed["join"].task["results"].data
    assert len(df) == 4 and _outcomes(df) == _four(_expected("ok"))
    # The resumed run's folder holds every cell: the one it ran, links to the cloned ones.
    cells = tmp_path / "reports" / resumed.id / "cells"
    assert sorted(p.name for p in cells.iterdir()) == sorted(df["cell_id"])
    assert sorted(p.name for p in cells.iterdir() if p.is_symlink()) == sorted(done)
    assert all((p / "metrics.json").is_file() for p in cells.iterdir())


def test_record_errors_finishes_with_the_error_in_its_row(tmp_path):
    matrix, _ = failing_matrix(tmp_path, on_error="record", exclude=FOUR)
    with _runner(tmp_path, matrix) as runner:
        result = runner.run(max_workers=8)
        assert result.status == "successful", (result.stdout + result.stderr)[-3000:]
        df = result.run["join"].task["results"].data
    assert len(df) == 4 and _outcomes(df) == _four(_expected("error"))
    row = df[df["outcome"] == "error"].iloc[0]
    assert row["error"].startswith("SafetensorError: Error while deserializing header")
    # The report of a run with failed cells: built, every cell in it, the failures listed.
    out = tmp_path / "reports" / result.run.id
    report = (out / "report.md").read_text()
    failed = report.split("## Cells that did not finish")[1].split("\n## ")[0]
    for _, r in df[df["outcome"] != "ok"].iterrows():
        assert f"| {r['cell_id']} | {r['outcome']} |" in failed
    assert "3 of 4 cells did not finish (1 error, 1 hang, 1 oom)" in report
    results = report.split("## Results")[1].split("\n## ")[0]
    assert all(cid in results for cid in df["cell_id"])  # failed cells stay in the main table
    assert (out / "report.html").is_file()
