"""Chat data (`data.task: chat`): OpenAI `messages` and ShareGPT `conversations`, rendered with
the model's chat template (or the documented fallback), loss on assistant turns only, every
turn kept; and the formats records come in (JSONL, JSON, Parquet, prompt/completion)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from steps.plan import data_sources as sources
from steps.plan.schema import DataSettings
from steps.trainer import data
from steps.trainer.tokenizer import ByteTokenizer, HFTokenizer
from tests.conftest import make_cell, torchrun_trainer

OPENAI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "6"},
]}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "2+2?"},
    {"from": "gpt", "value": "4"},
    {"from": "human", "value": "and 3+3?"},
    {"from": "gpt", "value": "6"},
]}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _trained_text(tok, example) -> list[str]:
    """The runs of trained tokens, decoded."""
    runs, current = [], []
    for token, trained in zip(example.ids, example.target):
        if trained:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def test_openai_and_sharegpt_records_are_the_same_conversation():
    assert sources.chat(OPENAI) == sources.chat(SHAREGPT)
    assert sources.chat(OPENAI).messages[2] == ("assistant", "4")
    with pytest.raises(ValueError, match=r"message roles \['bot'\] are not system/user/assistant"):
        sources.chat({"messages": [{"role": "bot", "content": "hi"}]})
    with pytest.raises(ValueError, match="no assistant turn to train on"):
        sources.chat({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(ValueError, match=r"expected messages \(role/content\) or conversations \(from/value\)"):
        sources.chat({"text": "hi"})


def test_fallback_template_trains_on_every_assistant_turn_only():
    tok = ByteTokenizer()
    example = data.encode_chat(tok, sources.chat(OPENAI), seq_len=512)
    assert example.ids[0] == tok.bos_id
    assert tok.decode(example.ids) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                                       "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nand 3+3?<|im_end|>\n"
                                       "<|im_start|>assistant\n6<|im_end|>\n")
    assert _trained_text(tok, example) == ["4<|im_end|>\n", "6<|im_end|>\n"]
    assert not example.cut and data.encode_chat(tok, sources.chat(OPENAI), seq_len=40).cut


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """A small byte-level BPE tokenizer with a chat template, saved and loaded as a model folder's."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Be brief. 2+2? 4 and 3+3? 6 assistant user system"] * 20, vocab_size=300,
                            special_tokens=["<s>", "</s>", "<pad>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = TEMPLATE
    folder = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(folder)
    return HFTokenizer(AutoTokenizer.from_pretrained(folder))


def test_the_model_template_decides_the_mask_multi_turn_included(hf_tokenizer):
    tok = hf_tokenizer
    conversation = sources.chat(SHAREGPT)
    example = data.encode_chat(tok, conversation, seq_len=512)
    rendered = tok.tok.apply_chat_template(conversation.as_dicts(), tokenize=False)
    assert tok.decode(example.ids[1:]) == rendered  # bos, then exactly the template's rendering
    # What each assistant turn adds to the rendering after the generation prompt: content + "</s>\n".
    assert _trained_text(tok, example) == ["4</s>\n", "6</s>\n"]


def test_records_come_from_jsonl_json_and_parquet_and_as_prompt_completion(tmp_path):
    rows = [OPENAI, SHAREGPT] * 10
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame({"messages": [r["messages"] for r in [OPENAI] * 20]}).to_parquet(tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.json", "a.parquet"):
        train, val, _ = sources.load_pairs(DataSettings(task="chat", path=str(tmp_path / name)), 128)
        assert len(train) + len(val) == 20 and all(c == sources.chat(OPENAI) for c in train + val), name
    (tmp_path / "pc.jsonl").write_text(json.dumps({"prompt": "Q: 1+1?\nA:", "completion": " 2"}) + "\n")
    train, val, _ = sources.load_pairs(DataSettings(task="instructions", path=str(tmp_path / "pc.jsonl"),
                                                     val_fraction=0.5), 64)
    assert train + val == [("Q: 1+1?\nA:", " 2")]
    (tmp_path / "bad.jsonl").write_text(json.dumps(OPENAI) + "\n" + json.dumps({"messages": [{"role": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 2: message roles \['x'\]"):
        sources.load_pairs(DataSettings(task="chat", path=str(tmp_path / "bad.jsonl")), 64)


@pytest.mark.slow
def test_a_chat_dataset_trains_and_its_val_loss_falls(tmp_path):
    """Multi-turn arithmetic chats: the assistant answers; the loss counts only its turns."""
    rows = []
    for i in range(400):
        a, b = i % 10, (i // 10) % 10
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}?"},
                                  {"role": "assistant", "content": str(a + b)},
                                  {"role": "user", "content": f"{b}+{a}?"},
                                  {"role": "assistant", "content": str(a + b)}]})
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cell = make_cell(lr=3e-3, seq_len=160, train={"max_steps": 40, "eval_every": 20, "save_adapter": False},
                     data={"task": "chat", "path": str(path), "val_samples": 32})
    proc, m = torchrun_trainer(cell, tmp_path / "out")
    assert m["outcome"] == "ok", m["error"]
    first, last = m["val_curve"][0]["val_loss"], m["val_curve"][-1]["val_loss"]
    assert math.isfinite(first) and last < first
    assert m["train_examples_cut"] == 0
    # Two answers of one or two characters, each with its end marker: 2 x (1..2 + 11) tokens.
    assert 24 * m["train_examples"] <= m["train_target_tokens"] <= 26 * m["train_examples"]
