"""Training data: every source becomes (prompt, answer) pairs or plain text, tokenised once,
then served in global batches.

Every rank walks the same global order and takes its own slice of each global batch, so a
cell's samples per optimizer step are the same whatever the world size, micro-batch and
accumulation: that is what makes strategies comparable step by step.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from steps.plan.schema import DataSettings
from steps.trainer.tokenizer import Tokenizer

IGNORE = -100
SYNTHETIC_DEFAULT_SAMPLES = (2048, 128)
CLASSIFICATION_PROMPT = "Review: {text}\nSentiment:"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx_note}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{ctx}### Response:\n"
)


@dataclass(frozen=True)
class Example:
    ids: list[int]
    # target[t]: ids[t] is predicted (from ids[:t]) and counts in the loss.
    target: list[bool]


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    val: list[Example]
    has_answers: bool  # accuracy is meaningful (synthetic, classification)
    source: str


# ---------------------------------------------------------------- sources as (prompt, answer)
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


def read_tsv(path: Path) -> list[dict[str, str]]:
    """A TSV with a header row; CRLF or LF line ends; quotes are not special (GLUE style)."""
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    header = [h.strip().lower() for h in rows[0]]
    return [dict(zip(header, (c.strip() for c in row))) for row in rows[1:] if row]


def classification_pairs(rows: list[dict[str, str]], data: DataSettings, source: Path) -> list[tuple[str, str]]:
    """label + text columns (text named sentence, content, text, ...) -> prompt and answer word."""
    if not rows:
        return []
    columns = list(rows[0])
    if "label" not in columns or len(columns) < 2:
        raise ValueError(f"{source}: expected a 'label' column and a text column, found {columns}")
    text_col = next(c for c in columns if c != "label")
    template = data.prompt_template or CLASSIFICATION_PROMPT
    pairs = []
    for row in rows:
        label = int(row["label"])
        if not 0 <= label < len(data.labels):
            raise ValueError(f"{source}: label {label} has no answer word in data.labels {data.labels}")
        pairs.append((template.format(text=row[text_col]), " " + data.labels[label]))
    return pairs


def instruction_pair(row: dict) -> tuple[str, str]:
    """Alpaca (instruction/input/output) or Dolly (instruction/context/response) records."""
    context = row.get("context") or row.get("input") or ""
    response = row.get("response", row.get("output"))
    if "instruction" not in row or response is None:
        raise ValueError(f"expected instruction and response/output fields, found {sorted(row)}")
    prompt = ALPACA_PROMPT.format(
        ctx_note=", paired with an input that provides further context" if context else "",
        instruction=row["instruction"], ctx=f"### Input:\n{context}\n\n" if context else "",
    )
    return prompt, str(response)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from None
    return rows


def find_split_files(folder: Path, suffixes: tuple[str, ...]) -> tuple[Path, Path | None]:
    files = sorted(p for p in folder.iterdir() if p.suffix in suffixes)
    train = next((p for p in files if "train" in p.stem), None)
    val = next((p for p in files if any(k in p.stem for k in ("dev", "val", "test"))), None)
    if train is None:
        raise FileNotFoundError(f"{folder}: no train file ({'/'.join(suffixes)}) found")
    return train, val


# ---------------------------------------------------------------- tokenising
def encode_pair(tok: Tokenizer, prompt: str, answer: str, seq_len: int) -> Example:
    """Loss on the answer and eos only; truncated to seq_len + 1 tokens (inputs + last target)."""
    p = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(prompt)
    a = tok.encode(answer) + [tok.eos_id]
    ids = (p + a)[: seq_len + 1]
    return Example(ids=ids, target=([False] * len(p) + [True] * len(a))[: len(ids)])


def blocks(ids: list[int], target: list[bool], seq_len: int) -> list[Example]:
    """Cut a token stream into rows of seq_len inputs (+1 for the last target), no padding."""
    return [
        Example(ids=ids[i : i + seq_len + 1], target=target[i : i + seq_len + 1])
        for i in range(0, len(ids) - seq_len, seq_len)
    ]


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    ids = [t for e in examples for t in e.ids]
    target = [m for e in examples for m in e.target]
    return blocks(ids, target, seq_len)


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(items) * fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def _limit(items: list, n: int | None) -> list:
    return items if n is None else items[:n]


def load_pairs(data: DataSettings, seq_len: int) -> tuple[list, list, bool]:
    """(train pairs, val pairs, whether the answers are labels that accuracy can score)."""
    if data.task in SYNTHETIC_TASKS:
        make = SYNTHETIC_TASKS[data.task]
        n_train = data.train_samples or SYNTHETIC_DEFAULT_SAMPLES[0]
        n_val = data.val_samples or SYNTHETIC_DEFAULT_SAMPLES[1]
        return make(n_train, seq_len, data.seed), make(n_val, seq_len, data.seed + 1), True
    if data.task == "hub":
        return hub_pairs(data)
    return (*_file_pairs(data), data.task == "classification")


def _file_pairs(data: DataSettings) -> tuple[list, list]:
    path = Path(data.path)
    if data.task == "classification":
        if path.is_dir():
            train_file, val_file = find_split_files(path, (".tsv",))
            train = classification_pairs(read_tsv(train_file), data, train_file)
            if val_file is not None:
                return train, classification_pairs(read_tsv(val_file), data, val_file)
            return _split(train, data.val_fraction, data.seed)
        return _split(classification_pairs(read_tsv(path), data, path), data.val_fraction, data.seed)
    if data.task == "instructions":
        if path.is_dir():
            train_file, val_file = find_split_files(path, (".jsonl", ".json"))
            train = [instruction_pair(r) for r in read_jsonl(train_file)]
            if val_file is not None:
                return train, [instruction_pair(r) for r in read_jsonl(val_file)]
            return _split(train, data.val_fraction, data.seed)
        return _split([instruction_pair(r) for r in read_jsonl(path)], data.val_fraction, data.seed)
    raise ValueError(f"task {data.task!r} has no (prompt, answer) pairs")


def hub_pairs(data: DataSettings) -> tuple[list, list, bool]:
    """datasets.load_dataset(hub_name, hub_config): a hub id, or a builder such as `json` with
    `path` as its data files. Rows are instructions or (label, text) classification."""
    from datasets import load_dataset

    kwargs = {"data_files": data.path} if data.path else {}
    ds = load_dataset(data.hub_name, data.hub_config, **kwargs)
    train_rows = list(ds["train"])
    val_split = next((s for s in ("validation", "dev", "test") if s in ds), None)
    val_rows = list(ds[val_split]) if val_split else None
    columns = set(train_rows[0]) if train_rows else set()
    classification = "instruction" not in columns
    if "instruction" in columns:
        convert = lambda rows: [instruction_pair(r) for r in rows]  # noqa: E731
    elif "label" in columns:
        convert = lambda rows: classification_pairs(  # noqa: E731
            [{k: str(v) for k, v in r.items()} for r in rows], data, Path(data.hub_name))
    else:
        raise ValueError(f"{data.hub_name}: rows need instruction/response or label/text fields, "
                         f"found {sorted(columns)}")
    if val_rows is None:
        return (*_split(convert(train_rows), data.val_fraction, data.seed), classification)
    return convert(train_rows), convert(val_rows), classification


def build_splits(data: DataSettings, tok: Tokenizer, seq_len: int) -> Splits:
    if data.task == "text":
        text = Path(data.path).read_text(encoding="utf-8")
        ids = tok.encode(text)
        rows = blocks(ids, [True] * len(ids), seq_len)
        n_val = max(1, int(len(rows) * data.val_fraction))
        train, val = rows[:-n_val], rows[-n_val:]  # held-out tail: no overlap with training text
        return Splits(_limit(train, data.train_samples), _limit(val, data.val_samples), False, data.path)
    train_pairs, val_pairs, has_answers = load_pairs(data, seq_len)
    train = [encode_pair(tok, p, a, seq_len) for p, a in _limit(train_pairs, data.train_samples)]
    val = [encode_pair(tok, p, a, seq_len) for p, a in _limit(val_pairs, data.val_samples)]
    if train and not any(any(e.target[1:]) for e in train):
        raise ValueError(
            f"no training example keeps an answer token within seq_len={seq_len} (the prompts "
            f"are longer); raise seq_len")
    if data.packing:
        train = pack(train, seq_len)
    return Splits(train, val, has_answers, data.path or data.hub_name or data.task)


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
    return {"input_ids": ids, "labels": labels, "attention_mask": mask if padded else None}


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
