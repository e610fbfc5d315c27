"""S3 transfers of the training emulator: input channels, checkpoints, output archives."""

from __future__ import annotations

import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any


def split_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"not an S3 URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def list_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(item["Key"] for item in page.get("Contents", []) if not item["Key"].endswith("/"))
    return sorted(keys)


def relative_key(key: str, prefix: str) -> str:
    """Where an object of an S3Prefix channel lands under the channel directory.

    Keys are taken relative to the prefix; a prefix that names one object
    (`.../sourcedir.tar.gz`) is that file.
    """
    if key == prefix:
        return key.rsplit("/", 1)[-1]
    return key[len(prefix) :].lstrip("/")


def download_prefix(s3: Any, uri: str, dest: Path, shard: tuple[int, int] | None = None) -> int:
    """Download every object under `uri` into `dest`; `shard` = (index, count) for ShardedByS3Key.

    Returns the number of files; raises FileNotFoundError when nothing matches.
    """
    bucket, prefix = split_s3(uri)
    keys = list_keys(s3, bucket, prefix)
    if not keys:
        raise FileNotFoundError(uri)
    if shard is not None:
        index, count = shard
        keys = keys[index::count]
    dest.mkdir(parents=True, exist_ok=True)
    for key in keys:
        rel = relative_key(key, prefix)
        if not rel:
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, key, str(target))
    return len(keys)


def upload_tar(s3: Any, sources: list[Path], uri: str) -> None:
    """Upload the files of `sources` (merged; the first holding a path wins) as one .tar.gz."""
    bucket, key = split_s3(uri)
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "out.tar.gz"
        seen: set[str] = set()
        with tarfile.open(archive, "w:gz") as tar:
            for source in sources:
                if not source.is_dir():
                    continue
                for path in sorted(source.rglob("*")):
                    rel = path.relative_to(source).as_posix()
                    if rel in seen or not (path.is_file() or path.is_dir()):
                        continue
                    seen.add(rel)
                    tar.add(path, arcname=rel, recursive=False)
        s3.upload_file(str(archive), bucket, key)


class CheckpointSync:
    """SageMaker's checkpoint sync: `local` filled from `uri` at start, new/changed files uploaded."""

    def __init__(self, s3: Any, local: Path, uri: str):
        self.s3, self.local = s3, local
        self.bucket, prefix = split_s3(uri)
        self.prefix = prefix.rstrip("/") + "/" if prefix.rstrip("/") else ""
        self.seen: dict[str, tuple[int, int]] = {}
        self.syncs = 0
        self.uploaded: list[str] = []

    def download(self) -> int:
        self.local.mkdir(parents=True, exist_ok=True)
        keys = list_keys(self.s3, self.bucket, self.prefix)
        for key in keys:
            rel = key[len(self.prefix) :]
            target = self.local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.bucket, key, str(target))
            stat = target.stat()
            self.seen[rel] = (stat.st_mtime_ns, stat.st_size)
        return len(keys)

    def sync(self) -> int:
        """Upload what is new or changed since the last pass; the number of files uploaded."""
        count = 0
        for dirpath, _, filenames in os.walk(self.local):
            for filename in filenames:
                path = Path(dirpath) / filename
                try:
                    stat = path.stat()
                except FileNotFoundError:
                    continue
                rel = path.relative_to(self.local).as_posix()
                state = (stat.st_mtime_ns, stat.st_size)
                if self.seen.get(rel) == state:
                    continue
                try:
                    self.s3.upload_file(str(path), self.bucket, self.prefix + rel)
                except FileNotFoundError:
                    continue
                self.seen[rel] = state
                self.uploaded.append(rel)
                count += 1
        self.syncs += 1
        return count
