"""Training data as (prompt, answer) examples, tokenised once, served in global batches.

Every rank walks the same global order and takes its own slice of each global batch, so a
cell's samples per optimizer step are the same whatever the world size, micro-batch and
accumulation: that is what makes strategies comparable step by step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from steps.schema import DataSettings
from steps.tokenizer import Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    # labels[t] is the token to predict after input_ids[t], IGNORE where no loss is taken.
    labels: list[int]


def synthetic_majority(n: int, seq_len: int, seed: int) -> list[tuple[str, str]]:
    """Which letter is in the majority: 'abbab=' -> 'b'. Odd lengths, so there is no tie.

    Learnable by a tiny model within a few hundred steps (attention can count), so the default
    matrix shows real learning and a learning-rate effect on CPU. Deterministic per (seed, index).
    """
    longest = max(1, seq_len - 3)  # bos + letters + '=' + answer + eos fits seq_len + 1
    pairs = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        length = 2 * rng.randint(longest // 8, (longest - 1) // 2) + 1
        letters = "".join(rng.choice("ab") for _ in range(length))
        pairs.append((f"{letters}=", "a" if letters.count("a") > letters.count("b") else "b"))
    return pairs


def synthetic_reverse(n: int, seq_len: int, seed: int) -> list[tuple[str, str]]:
    """Reverse a string of letters: 'cabd=' -> 'dbac'. A harder, generative task."""
    longest = max(1, (seq_len - 3) // 2)
    pairs = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        letters = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(max(1, longest // 2), longest)))
        pairs.append((f"{letters}=", letters[::-1]))
    return pairs


SYNTHETIC_TASKS = {"synthetic": synthetic_majority, "synthetic-reverse": synthetic_reverse}


def encode_pair(tok: Tokenizer, prompt: str, answer: str, seq_len: int) -> Example:
    """Loss on the answer (and eos) only; truncated to seq_len."""
    p = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    a = tok.encode(answer) + [tok.eos_id]
    ids = (p + a)[: seq_len + 1]
    targets = ([IGNORE] * len(p) + a)[: seq_len + 1]
    return Example(input_ids=ids[:-1], labels=targets[1:])


def build_splits(data: DataSettings, tok: Tokenizer, seq_len: int) -> tuple[list[Example], list[Example]]:
    make = SYNTHETIC_TASKS[data.task]
    train = make(data.train_samples, seq_len, data.seed)
    val = make(data.val_samples, seq_len, data.seed + 1)
    return (
        [encode_pair(tok, p, a, seq_len) for p, a in train],
        [encode_pair(tok, p, a, seq_len) for p, a in val],
    )


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the micro-batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class GlobalBatches:
    """Step s uses samples order[s*G:(s+1)*G] of a per-epoch shuffle; rank r takes its slice."""

    def __init__(self, examples: list[Example], global_batch: int, seed: int):
        if len(examples) < global_batch:
            raise ValueError(
                f"data has {len(examples)} training samples, fewer than one global batch "
                f"({global_batch}); raise data.train_samples or lower the batch"
            )
        self.examples = examples
        self.global_batch = global_batch
        self.seed = seed
        self.steps_per_epoch = len(examples) // global_batch
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._orders[epoch]

    def micro_batches(self, step: int, rank: int, world: int, micro_batch: int, pad_id: int):
        """The `grad_accum` micro-batches this rank runs at optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        idx = self._order(epoch)[start : start + self.global_batch]
        per_rank = self.global_batch // world
        mine = idx[rank * per_rank : (rank + 1) * per_rank]
        return [
            collate([self.examples[i] for i in mine[k : k + micro_batch]], pad_id)
            for k in range(0, per_rank, micro_batch)
        ]


def shard(examples: list[Example], rank: int, world: int) -> list[Example]:
    return examples[rank::world]
