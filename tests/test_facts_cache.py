"""The models' facts are asked of a subprocess once per question; the same question asked again
(the same cells, machine, libraries, code and files) is answered from the cache, and any change
to what the answer was read from asks again."""

from __future__ import annotations

import json
import os

import pytest

from steps.plan import facts_cache, preflight
from tests.conftest import make_cell
from tests.test_flow_failures import save_model


def _kept(tmp_path) -> list:
    return sorted((tmp_path / "cache" / "facts").glob("*.json"))


@pytest.mark.slow  # two facts subprocesses (torch, transformers: seconds each)
def test_the_same_question_is_answered_from_the_cache_and_a_changed_file_asks_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_MATRIX_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    save_model(folder)
    cells = [make_cell(model=str(folder)), make_cell(model="llama-debug", peft="full")]

    first = preflight.gather_facts(cells)
    assert first["models"][str(folder)]["layers"] == 2
    (path,) = _kept(tmp_path)
    assert json.loads(path.read_text()) == first
    # Marked, the kept answer is what the next plan reads: no subprocess ran (it would say 2).
    marked = {**first, "models": {**first["models"], str(folder): {**first["models"][str(folder)], "layers": 99}}}
    path.write_text(json.dumps(marked))
    assert preflight.gather_facts(cells)["models"][str(folder)]["layers"] == 99

    # The model's folder changed (its config saved again): the question is asked again.
    config = folder / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 1_000_000))
    assert preflight.gather_facts(cells)["models"][str(folder)]["layers"] == 2
    assert len(_kept(tmp_path)) == 2

    monkeypatch.setenv("FINETUNE_MATRIX_FACTS_CACHE", "0")  # off: nothing read, nothing kept
    path.unlink()
    for other in _kept(tmp_path):
        other.write_text(json.dumps(marked))
    assert preflight.gather_facts(cells)["models"][str(folder)]["layers"] == 2
    assert [json.loads(p.read_text()) for p in _kept(tmp_path)] == [marked]  # the answer was not kept


@pytest.mark.slow
def test_an_answer_with_a_problem_is_not_kept(tmp_path, monkeypatch):
    """The user is about to mend it: a kept "cannot be loaded" would outlive the mending."""
    monkeypatch.setenv("FINETUNE_MATRIX_CACHE", str(tmp_path / "cache"))
    facts = preflight.gather_facts([make_cell(model=str(tmp_path / "absent"))])
    assert "error" in facts["models"][str(tmp_path / "absent")]
    assert _kept(tmp_path) == []


def test_the_key_follows_each_thing_the_answer_depends_on(tmp_path, monkeypatch):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    query = [make_cell(model="llama-debug", data={"task": "instructions", "path": str(data)}).model_dump(mode="json")]
    machine = facts_cache.this_machine()
    base = facts_cache.key(query, machine)
    assert facts_cache.key(query, machine) == base  # nothing changed
    assert facts_cache.key(query, {**machine, "gpus": ["NVIDIA H100 80GB HBM3"]}) != base
    assert facts_cache.key([{**query[0], "seq_len": 64}], machine) != base
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert facts_cache.key(query, machine) != base
    monkeypatch.delenv("HF_HUB_OFFLINE")
    data.write_text('{"prompt": "a", "completion": "c"}\n{"prompt": "d", "completion": "e"}\n')  # the data changed
    assert facts_cache.key(query, machine) != base
    monkeypatch.setattr(facts_cache, "_versions", lambda: {"transformers": "0.0"})  # another library
    changed = facts_cache.key(query, machine)
    monkeypatch.undo()
    assert changed != facts_cache.key(query, machine)


def test_a_hub_id_is_keyed_by_its_copies_in_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    query = [make_cell(model="org/some-model").model_dump(mode="json")]
    absent = facts_cache.key(query, {})
    snapshot = tmp_path / "hub" / "models--org--some-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    downloaded = facts_cache.key(query, {})
    assert downloaded != absent  # downloaded since
    (tmp_path / "hub" / "datasets--org--some-model").mkdir()
    (tmp_path / "hub" / "datasets--org--some-model" / "data.parquet").write_text("rows")
    assert facts_cache.key(query, {}) != downloaded  # a dataset of that name, as data.path would name it


def test_problems_are_found_in_models_adapters_and_data():
    ok = {"models": {"m": {"adapters": {"k": {"trainable": 1}}}}, "data": {"d": {"train": 3, "val": 1}}}
    assert not facts_cache.has_problem(ok)
    assert facts_cache.has_problem({**ok, "models": {"m": {"error": "gone"}}})
    assert facts_cache.has_problem({**ok, "models": {"m": {"adapters": {"k": {"error": "matches nothing"}}}}})
    assert facts_cache.has_problem({**ok, "data": {"d": {"error": "does not parse"}}})
