"""Where examples come from, before any tokenizer: every source becomes (prompt, answer) pairs
(or plain text), read and checked without torch, so that the planner can check data files
before launch with the same code the trainer reads them with."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from steps.plan.schema import DataSettings

SYNTHETIC_DEFAULT_SAMPLES = (2048, 128)
CLASSIFICATION_PROMPT = "Review: {text}\nSentiment:"
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx_note}. Write a response that "
    "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{ctx}### Response:\n"
)



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


@dataclass(frozen=True)
class Chat:
    """One conversation, every turn kept: (role, content) with roles system, user, assistant."""

    messages: tuple[tuple[str, str], ...]

    def as_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


CHAT_ROLES = ("system", "user", "assistant")
# ShareGPT's `from` names (and the usual variants) as OpenAI roles.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "model": "assistant", "chatgpt": "assistant"}
# The template a model without one of its own is given (ChatML): the role header is prompt,
# the content and its end marker are what an assistant turn trains on.
FALLBACK_CHAT_HEADER = "<|im_start|>{role}\n"
FALLBACK_CHAT_END = "<|im_end|>\n"


def chat(row: dict) -> Chat:
    """OpenAI `messages` (role/content) or ShareGPT `conversations` (from/value)."""
    if isinstance(row.get("messages"), list):
        turns = [(m.get("role"), m.get("content")) for m in row["messages"]]
        unknown = sorted({str(r) for r, _ in turns if r not in CHAT_ROLES})
        if unknown:
            raise ValueError(f"message roles {unknown} are not {'/'.join(CHAT_ROLES)}")
    elif isinstance(row.get("conversations"), list):
        turns = [(SHAREGPT_ROLES.get(str(m.get("from")).lower()), m.get("value")) for m in row["conversations"]]
        unknown = sorted({str(m.get("from")) for m in row["conversations"]
                          if str(m.get("from")).lower() not in SHAREGPT_ROLES})
        if unknown:
            raise ValueError(f"conversation turns from {unknown}: not one of {', '.join(SHAREGPT_ROLES)}")
    else:
        raise ValueError(f"expected messages (role/content) or conversations (from/value), found {sorted(row)}")
    if any(not isinstance(content, str) for _, content in turns):
        raise ValueError("every turn needs a text content/value")
    if not any(role == "assistant" for role, _ in turns):
        raise ValueError("no assistant turn to train on")
    return Chat(tuple(turns))


def fallback_chat_segments(conversation: Chat) -> list[tuple[str, bool]]:
    """The conversation in the fallback template, as (text, trained) pieces."""
    out = []
    for role, content in conversation.messages:
        out += [(FALLBACK_CHAT_HEADER.format(role=role), False), (content + FALLBACK_CHAT_END, role == "assistant")]
    return out


def row_example(row: dict, task: str) -> tuple[str, str] | Chat:
    """A row of a chat or instructions file: a conversation, or a (prompt, answer) pair from
    prompt/completion, Alpaca or Dolly fields."""
    if task == "chat":
        return chat(row)
    if "prompt" in row and "completion" in row:
        return str(row["prompt"]), str(row["completion"])
    return instruction_pair(row)


ROW_SUFFIXES = (".jsonl", ".json", ".parquet")


def read_rows(path: Path) -> list[dict]:
    """Records of a JSONL, JSON (a list of records) or Parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()  # nested lists and records as Python ones
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return read_jsonl(path)  # JSON Lines named .json
        rows = rows.get("data", rows) if isinstance(rows, dict) else rows
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a list of records")
        return rows
    return read_jsonl(path)


def row_examples(rows: list[dict], task: str, source: Path) -> list:
    out = []
    for number, row in enumerate(rows, 1):
        try:
            out.append(row_example(row, task))
        except (ValueError, AttributeError, TypeError) as exc:
            raise ValueError(f"{source}: record {number}: {exc}") from None
    return out


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


def _split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(items) * fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def limit(items: list, n: int | None) -> list:
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
    if data.task in ("instructions", "chat"):
        if path.is_dir():
            train_file, val_file = find_split_files(path, ROW_SUFFIXES)
            train = row_examples(read_rows(train_file), data.task, train_file)
            if val_file is not None:
                return train, row_examples(read_rows(val_file), data.task, val_file)
            return _split(train, data.val_fraction, data.seed)
        return _split(row_examples(read_rows(path), data.task, path), data.val_fraction, data.seed)
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
    classification = not columns & {"instruction", "prompt", "messages", "conversations"}
    if columns & {"messages", "conversations"}:
        convert = lambda rows: row_examples(rows, "chat", Path(data.hub_name))  # noqa: E731
    elif columns & {"instruction", "prompt"}:
        convert = lambda rows: row_examples(rows, "instructions", Path(data.hub_name))  # noqa: E731
    elif "label" in columns:
        convert = lambda rows: classification_pairs(  # noqa: E731
            [{k: str(v) for k, v in r.items()} for r in rows], data, Path(data.hub_name))
    else:
        raise ValueError(f"{data.hub_name}: rows need instruction/response or label/text fields, "
                         f"found {sorted(columns)}")
    if val_rows is None:
        return (*_split(convert(train_rows), data.val_fraction, data.seed), classification)
    return convert(train_rows), convert(val_rows), classification


