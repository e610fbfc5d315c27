"""Packing keeps examples apart: a packed row's loss is the sum of its examples' own losses.

Rows of several examples end to end carry position ids that restart where an example starts;
transformers turns them into a block-diagonal causal mask (sdpa, eager) and FlashAttention-2
into separate sequences, and rotary embeddings take each token's position in its own example.
"""

from __future__ import annotations

import pytest
import torch

from steps.trainer import data, modeling
from steps.trainer.engines.base import token_loss_sum
from tests.conftest import make_cell


def _examples() -> list[data.Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (10, 7, 15):  # 32 tokens: one row of 31 inputs
        ids = torch.randint(3, 200, (n,), generator=g).tolist()
        out.append(data.Example(ids=ids, target=[False] + [True] * (n - 1)))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_row_s_loss_is_the_sum_of_its_examples_losses(attn):
    cell = make_cell(train={"attn_implementation": attn})
    model = modeling.load_model(cell, modeling.load_tokenizer(cell).vocab_size, torch.device("cpu")).eval()
    examples = _examples()
    (row,) = data.pack(examples, seq_len=31)
    assert row.positions == [*range(10), *range(7), *range(15)]
    packed = data.collate([row], pad_id=0)
    assert packed["attention_mask"] is None and packed["position_ids"][0].tolist() == row.positions[:-1]

    def loss(batch, positions=True):
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           position_ids=batch.get("position_ids") if positions else None, use_cache=False).logits
        return token_loss_sum(logits, batch["labels"]).item()

    apart = sum(loss(data.collate([e], pad_id=0)) for e in examples)
    assert loss(packed) == pytest.approx(apart, rel=1e-5)
    # Without the position ids the later examples attend to the earlier ones: another number.
    assert abs(loss(packed, positions=False) - apart) > 1e-3 * apart


def test_packing_never_pads_and_keeps_positions_across_row_cuts():
    examples = _examples()
    rows = data.pack(examples, seq_len=8)  # 32 tokens: rows of 9 (8 inputs + the last target)
    assert [len(r.ids) for r in rows] == [9, 9, 9]
    assert rows[1].positions == [8, 9, 0, 1, 2, 3, 4, 5, 6]  # the first example's end, then the second's start
    batch = data.collate(rows, pad_id=0)
    assert batch["position_ids"].shape == batch["input_ids"].shape == (3, 8)
