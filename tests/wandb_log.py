"""W&B's transaction log (`run-<id>.wandb`, what an offline run keeps and `wandb sync` uploads)
read back into its protobuf records: W&B 0.31 ships no Python reader of it, and an offline run
writes its config, history and summary only there.

The format is LevelDB's log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each `crc32c (4) | length (2, little-endian) | type (1) | data`, type 1 a whole
record, 2/3/4 its first, middle and last parts; a block's tail under 7 bytes is padding.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B" and struct.unpack("<H", raw[4:6])[0] == 0xBEE1, "not a W&B transaction log"
    out, pos, part = [], HEADER, b""
    while pos + HEADER <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + HEADER])
        data = raw[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        part = data if kind in (1, 2) else part + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def run_of(path: Path) -> dict[str, Any]:
    """The run's config (key: value), history rows and summary, as an offline run kept them."""
    config, history, summary = {}, [], {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):  # the run record carries the config wandb.init was given
            items = r.run.config.update if kind == "run" else r.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    return {"config": config, "history": history, "summary": summary}
