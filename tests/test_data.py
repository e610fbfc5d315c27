"""Data sources: real SST-2 and Tiny Shakespeare from ../shared, JSONL instructions, the hub
loader on local files, synthetic tasks, packing and the global batch order."""

from __future__ import annotations

import json

import pytest

from steps.plan import data_sources as sources
from steps.plan.schema import DataSettings
from steps.trainer import data
from steps.trainer.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_sst2_real_files_with_their_different_headers_and_line_ends(shared_data):
    splits = data.build_splits(DataSettings(task="classification", path=str(shared_data / "sst2")), TOK, 128)
    assert len(splits.train) == 67_349 and len(splits.val) == 872
    assert splits.has_answers
    pairs_train, pairs_val, _ = sources.load_pairs(DataSettings(task="classification", path=str(shared_data / "sst2")), 128)
    assert all("\r" not in p and p.startswith("Review: ") and p.endswith("\nSentiment:") for p, _ in pairs_train[:500])
    assert {a for _, a in pairs_train} == {" negative", " positive"}
    assert {a for _, a in pairs_val} == {" negative", " positive"}
    # dev.tsv names its text column `content`, train.tsv `sentence`: both are read.
    assert pairs_val[0][0] != "Review: \nSentiment:" and pairs_train[0][0] != "Review: \nSentiment:"
    # Loss only on the answer: " positive"/" negative" plus eos.
    e = splits.val[0]
    answer_tokens = [t for t, m in zip(e.ids, e.target) if m]
    assert TOK.decode(answer_tokens) in (" negative", " positive")
    assert answer_tokens[-1] == TOK.eos_id


def test_text_is_packed_in_full_blocks_with_a_held_out_tail(shared_data):
    path = shared_data / "tinyshakespeare" / "input.txt"
    splits = data.build_splits(DataSettings(task="text", path=str(path), val_fraction=0.1), TOK, 256)
    n_blocks = (len(path.read_bytes()) - 1) // 256
    assert len(splits.train) + len(splits.val) == n_blocks
    assert len(splits.val) == n_blocks // 10
    assert all(len(e.ids) == 257 and all(e.target) for e in splits.train[:50])
    assert not splits.has_answers
    assert TOK.decode(splits.train[0].ids).startswith("First Citizen:")


def test_instructions_in_alpaca_and_dolly_fields(tmp_path):
    rows = [{"instruction": "Add.", "input": "2+2", "output": "4"},
            {"instruction": "Greet.", "context": "", "response": "Hello"}] * 10
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, val, has_answers = sources.load_pairs(DataSettings(task="instructions", path=str(path), val_fraction=0.1), 512)
    assert len(train) == 18 and len(val) == 2 and not has_answers
    prompt, answer = sources.instruction_pair(rows[0])
    assert "### Instruction:\nAdd.\n\n### Input:\n2+2\n\n### Response:\n" in prompt
    assert "paired with an input" in prompt and answer == "4"
    prompt, answer = sources.instruction_pair(rows[1])
    assert "### Input" not in prompt and answer == "Hello"
    with pytest.raises(ValueError, match="expected instruction and response/output fields"):
        sources.instruction_pair({"question": "?"})


def test_hub_loader_reads_a_local_json_dataset(tmp_path):
    path = tmp_path / "sst.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": f"film {i}", "label": i % 2}) for i in range(40)))
    settings = DataSettings(task="hub", hub_name="json", path=str(path), val_fraction=0.25)
    splits = data.build_splits(settings, TOK, 64)
    assert len(splits.train) == 30 and len(splits.val) == 10 and splits.has_answers


def test_packing_joins_examples_without_padding_and_keeps_the_loss_masks():
    pairs = sources.synthetic_majority(64, 32, seed=1)
    examples = [data.encode_pair(TOK, p, a, 32) for p, a in pairs]
    packed = data.pack(examples, 32)
    assert all(len(e.ids) == 33 for e in packed)
    n_tokens = sum(len(e.ids) for e in examples)
    assert len(packed) == (n_tokens - 1) // 32
    # Each target token is a label once (a block's first token is only an input).
    labels = sum(sum(e.target[1:]) for e in packed)
    assert sum(sum(e.target) for e in examples) - 1 - labels < 33


def test_synthetic_majority_is_deterministic_balanced_and_fits():
    a = sources.synthetic_majority(1000, 64, seed=7)
    assert a == sources.synthetic_majority(1000, 64, seed=7)
    assert a != sources.synthetic_majority(1000, 64, seed=8)
    assert 400 < sum(ans == "a" for _, ans in a) < 600
    for prompt, ans in a:
        letters = prompt[:-1]
        assert len(letters) % 2 == 1 and len(prompt) + len(ans) + 2 <= 65
        assert ans == max("ab", key=letters.count)


def test_every_replica_gets_its_slice_of_the_same_global_batch():
    examples = [data.encode_pair(TOK, p, a, 32) for p, a in sources.synthetic_majority(40, 32, 0)]
    batches = data.GlobalBatches(examples, global_batch=8, seed=3)
    whole = batches.replica_examples(step=2, replica=0, replicas=1)
    halves = batches.replica_examples(2, 0, 2) + batches.replica_examples(2, 1, 2)
    assert whole == halves and len(whole) == 8
    assert batches.steps_per_epoch == 5
    # The next epoch reshuffles.
    assert batches.replica_examples(5, 0, 1) != batches.replica_examples(0, 0, 1)
    micro = batches.micro_batches(2, 0, 1, micro_batch=4, pad_id=TOK.pad_id, width=40)
    assert [tuple(b["input_ids"].shape) for b in micro] == [(4, 40), (4, 40)]


def test_too_few_samples_for_one_global_batch_is_explained():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        data.GlobalBatches([data.Example([1, 2], [False, True])] * 3, global_batch=4, seed=0)
