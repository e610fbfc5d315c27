"""Training data: the sources' (prompt, answer) pairs or plain text (`steps.plan.data_sources`),
tokenised once, then served in global batches.

Every rank walks the same global order and takes its own slice of each global batch, so a
cell's samples per optimizer step are the same whatever the world size, micro-batch and
accumulation: that is what makes strategies comparable step by step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from steps.plan.data_sources import Chat, limit, load_pairs
from steps.plan.schema import DataSettings
from steps.trainer.tokenizer import Tokenizer

IGNORE = -100


@dataclass(frozen=True)
class Example:
    ids: list[int]
    # target[t]: ids[t] is predicted (from ids[:t]) and counts in the loss.
    target: list[bool]
    cut: bool = False  # longer than seq_len + 1 tokens: its end was dropped
    # Packed rows: each token's position within the example it came from (restarting at 0 where
    # an example starts), so that attention and rotary embeddings keep the examples apart.
    positions: list[int] | None = None


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    has_answers: bool  # accuracy is meaningful (synthetic, classification)
    source: str
    train_cut: int = 0  # training examples cut short by seq_len
    train_target_tokens: int = 0  # tokens the loss is computed on, one pass over the training split


# ---------------------------------------------------------------- tokenising
def encode_pair(tok: Tokenizer, prompt: str, answer: str, seq_len: int) -> Example:
    """Loss on the answer and eos only; truncated to seq_len + 1 tokens (inputs + last target)."""
    p = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    a = tok.encode(answer) + [tok.eos_id]
    return _example(p + a, [False] * len(p) + [True] * len(a), seq_len)


def encode_chat(tok: Tokenizer, conversation: Chat, seq_len: int) -> Example:
    """Every turn, rendered with the model's chat template; loss on the assistant turns only."""
    segments = tok.chat_segments(conversation)
    ids: list[int] = []
    target: list[bool] = []
    if tok.bos_id is not None and not (segments and tok.encode(segments[0][0])[:1] == [tok.bos_id]):
        ids, target = [tok.bos_id], [False]
    for text, trained in segments:
        piece = tok.encode(text)
        ids += piece
        target += [trained] * len(piece)
    return _example(ids, target, seq_len)


def _example(ids: list[int], target: list[bool], seq_len: int) -> Example:
    """Truncated to seq_len + 1 tokens (inputs + the last target)."""
    return Example(ids=ids[: seq_len + 1], target=target[: seq_len + 1], cut=len(ids) > seq_len + 1)


def encode(tok: Tokenizer, item, seq_len: int) -> Example:
    return encode_chat(tok, item, seq_len) if isinstance(item, Chat) else encode_pair(tok, *item, seq_len)


def blocks(ids: list[int], target: list[bool], seq_len: int, positions: list[int] | None = None) -> list[Example]:
    """Cut a token stream into rows of seq_len inputs (+1 for the last target), no padding."""
    return [
        Example(ids=ids[i : i + seq_len + 1], target=target[i : i + seq_len + 1],
                positions=positions[i : i + seq_len + 1] if positions is not None else None)
        for i in range(0, len(ids) - seq_len, seq_len)
    ]


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Examples end to end in full rows (no padding), each keeping its own positions: the model
    sees where one ends and the next starts (transformers builds a block-diagonal causal mask
    from position ids that restart, and FlashAttention-2 runs them as separate sequences), so
    no example attends to another. The first token of an example is never a target."""
    ids = [t for e in examples for t in e.ids]
    target = [m for e in examples for m in e.target]
    positions = [i for e in examples for i in range(len(e.ids))]
    return blocks(ids, target, seq_len, positions)


def build_splits(data: DataSettings, tok: Tokenizer, seq_len: int) -> Splits:
    if data.task == "text":
        text = Path(data.path).read_text(encoding="utf-8")
        ids = tok.encode(text)
        rows = blocks(ids, [True] * len(ids), seq_len)
        n_val = max(1, int(len(rows) * data.val_fraction))
        train, val = rows[:-n_val], rows[-n_val:]  # held-out tail: no overlap with training text
        train = limit(train, data.train_samples)
        return Splits(train, limit(val, data.val_samples), False, data.path,
                      train_target_tokens=sum(len(e.ids) - 1 for e in train))
    train_pairs, val_pairs, has_answers = load_pairs(data, seq_len)
    train = [encode(tok, item, seq_len) for item in limit(train_pairs, data.train_samples)]
    val = [encode(tok, item, seq_len) for item in limit(val_pairs, data.val_samples)]
    if train and not any(any(e.target[1:]) for e in train):
        raise ValueError(
            f"no training example keeps an answer token within seq_len={seq_len} (the prompts "
            f"are longer); raise seq_len")
    cut, targets = sum(e.cut for e in train), sum(sum(e.target[1:]) for e in train)
    if data.packing:
        train = pack(train, seq_len)
    return Splits(train, val, has_answers, data.path or data.hub_name or data.task, cut, targets)


# ---------------------------------------------------------------- batches
def collate(examples: list[Example], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (or `width`); labels are the next tokens.

    `attention_mask` is None when nothing is padded: the model then takes its causal fast path
    instead of building and applying a mask of ones.
    """
    width = width or max(len(e.ids) - 1 for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        ids[row, :n] = torch.tensor(e.ids[:-1])
        labels[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(e.ids[1:], e.target[1:])])
        mask[row, :n] = 1
    padded = any(len(e.ids) - 1 < width for e in examples)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask if padded else None}
    if any(e.positions is not None for e in examples):
        if padded:
            raise ValueError("packed rows are never padded")
        batch["position_ids"] = torch.tensor([e.positions[:-1] for e in examples], dtype=torch.long)
    return batch


def to_device(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    return {k: (t.to(device) if t is not None else None) for k, t in batch.items()}


def real_tokens(batch: dict[str, torch.Tensor | None]) -> int:
    """Tokens that are not padding."""
    mask = batch["attention_mask"]
    return batch["input_ids"].numel() if mask is None else int(mask.sum().item())


class GlobalBatches:
    """Step s uses samples order[s*G:(s+1)*G] of a per-epoch shuffle; replica r takes its slice."""

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

    def replica_examples(self, step: int, replica: int, replicas: int) -> list[Example]:
        """The samples data-parallel replica `replica` trains on at optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch
        idx = self._order(epoch)[start : start + self.global_batch]
        per = self.global_batch // replicas
        return [self.examples[i] for i in idx[replica * per : (replica + 1) * per]]

    def micro_batches(self, step: int, replica: int, replicas: int, micro_batch: int,
                      pad_id: int, width: int | None = None) -> list[dict[str, torch.Tensor]]:
        """The `grad_accum` micro-batches of this replica at `step` (`width`: pad all to it)."""
        mine = self.replica_examples(step, replica, replicas)
        return [collate(mine[k : k + micro_batch], pad_id, width) for k in range(0, len(mine), micro_batch)]


def shard(examples: list[Example], rank: int, world: int) -> list[Example]:
    return examples[rank::world]
