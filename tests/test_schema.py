"""Matrix validation: every kind of bad input gives its message, all problems at once."""

from __future__ import annotations

import copy

import pytest
import yaml

from steps.plan.matrix import expand, load_matrix, parse_matrix
from steps.plan.schema import STRATEGIES, ConfigError
from tests.conftest import REPO

GOOD = {
    "name": "t", "models": ["llama-debug"], "peft": ["lora"], "strategy": ["single", "ddp"],
    "gpus": [2], "lr": [1e-3], "micro_batch": [4], "seq_len": [32],
}


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_matrix(data)
    return info.value.problems


def with_(**changes):
    data = copy.deepcopy(GOOD)
    data.update(changes)
    return data


def test_default_matrix_is_valid_and_expands_to_four_runnable_cells():
    cells = expand(load_matrix(REPO / "configs/matrix/default.yaml"))
    assert [(p.cell.strategy, p.cell.world_size, p.cell.lr) for p in cells] == [
        ("single", 1, 3e-3), ("single", 1, 1e-2), ("ddp", 2, 3e-3), ("ddp", 2, 1e-2)]
    assert all(p.refused is None for p in cells)


def test_single_values_are_accepted_as_one_element_axes():
    spec = parse_matrix(with_(peft="lora", lr=0.01, strategy="ddp"))
    assert spec.peft == ["lora"] and spec.lr == [0.01] and spec.strategy == ["ddp"]


def test_unknown_top_level_key():
    (msg,) = problems(with_(learning_rate=[1e-3]))
    assert msg.startswith("learning_rate: unknown key")
    assert "allowed keys: data, description, exclude" not in msg  # no invented keys
    assert "lr" in msg.split("allowed keys:")[1]


def test_unknown_nested_key_suggests_the_near_one():
    (msg,) = problems(with_(train={"lora": {"rank": 8}}))
    assert msg == ("train.lora.rank: unknown key (did you mean 'r'?); allowed keys: "
                   "alpha, dropout, r, target_modules")


def test_unknown_strategy_lists_allowed_values():
    (msg,) = problems(with_(strategy=["single", "ddpp"]))
    assert msg.startswith("strategy[1]: 'ddpp' is not allowed; allowed values: ")
    for name in STRATEGIES:
        assert f"'{name}'" in msg


def test_unknown_peft_and_precision():
    msgs = problems(with_(peft=["lora", "adalora"], precision=["bf16"]))
    assert msgs[0].startswith("peft[1]: 'adalora' is not allowed; allowed values: 'full', 'lora', 'qlora', 'dora'")
    assert msgs[1].startswith("precision[0]: 'bf16' is not allowed; allowed values: 'fp32', 'fp16-mixed'")


def test_negative_and_zero_numbers():
    msgs = problems(with_(lr=[-0.001], micro_batch=[0]))
    assert msgs == ["lr[0]: -0.001 is invalid: input should be greater than 0",
                    "micro_batch[0]: 0 is invalid: input should be greater than 0"]


def test_wrong_type():
    (msg,) = problems(with_(micro_batch=["eight"]))
    assert msg.startswith("micro_batch[0]: 'eight' is invalid: input should be a valid integer")


def test_missing_required_keys():
    data = with_()
    del data["models"], data["lr"]
    assert problems(data) == ["models: required key is missing", "lr: required key is missing"]


def test_unknown_model_and_instance_name_what_exists():
    msgs = problems(with_(models=["llama-nonexistent"], instance=["p9.huge"]))
    assert msgs[0].startswith("models[0]: 'llama-nonexistent' is not a model preset")
    assert "llama-debug" in msgs[0]
    assert msgs[1].startswith("instance[0]: 'p9.huge' is not in configs/instances.yaml; allowed values: ")
    assert "local-cpu" in msgs[1]


def test_hub_ids_and_local_directories_are_model_references(tmp_path):
    parse_matrix(with_(models=["TinyLlama/TinyLlama-1.1B-Chat-v1.0", str(tmp_path)]))


def test_three_mistakes_are_reported_together():
    data = with_(strategy=["single", "pipeline-ish"], lr=[-1e-4], optimiser="adam")
    with pytest.raises(ConfigError) as info:
        parse_matrix(data)
    text = str(info.value)
    assert "3 problem(s)" in text
    assert "optimiser: unknown key" in text
    assert "strategy[1]: 'pipeline-ish' is not allowed" in text
    assert "lr[0]: -0.0001 is invalid: input should be greater than 0" in text


def test_not_a_mapping():
    assert problems(["a", "list"]) == ["<top>: expected a mapping of keys, got list"]


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_(strategy=["zero4"])))
    with pytest.raises(ConfigError, match=str(path)):
        load_matrix(path)
