"""The models' facts of a matrix, kept on this machine so that planning it again (`resume`, a
second `steps.plan`, the same model in the next matrix) does not pay the facts' subprocess
again: about 5 s of imports (torch, transformers, PEFT) for a debug model, more for a large one.

An answer is reused only for the same question asked of the same things: the cells asked about,
this machine (its host name, GPUs and Python, the libraries' versions), this checkout's code and
catalogs, the Hub settings, and every local file or folder the cells name (model folders,
tokenizers, data files; sizes and modification times), with the Hugging Face cache's copies of
each Hub id they name (as a model and as a dataset). An
answer that holds a problem (a model that cannot be found, data that does not parse) is never
kept: the user is about to mend it. `FINETUNE_MATRIX_CACHE` moves the folder; `FINETUNE_MATRIX_FACTS_CACHE=0`
turns this off.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
from pathlib import Path
from typing import Any

from steps import CONFIGS_DIR, REPO_ROOT, cache_root, library_versions

VERSION = 1  # what an answer holds: a change here invalidates every kept one
KEPT = 200  # answers kept; the oldest go first
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "tokenizers", "huggingface_hub")
ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "FINETUNE_MATRIX_GPUS")
FILES_PER_FOLDER = 10_000  # a folder's fingerprint lists at most this many files
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def enabled() -> bool:
    return os.environ.get("FINETUNE_MATRIX_FACTS_CACHE", "1") not in ("0", "false", "no", "off")


def key(query: list[dict[str, Any]], machine: dict[str, Any] | None = None) -> str:
    """What the answer to `query` (cells as JSON) depends on, as one hash; `machine`: this one's
    GPUs and Python where not given."""
    names = _named(query)
    body = {"version": VERSION, "query": query, "machine": this_machine() if machine is None else machine,
            "libraries": _versions(),
            "environment": {k: os.environ.get(k) for k in ENVIRONMENT}, "code": _code(),
            "files": {name: _fingerprint(name) for name in sorted(names)}}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:24]


def this_machine() -> dict[str, Any]:
    """What of this machine the facts hold (its GPUs), and the Python that reads them."""
    from steps.plan import catalog

    return {"gpus": [name for name, _ in catalog.local_gpus()], "python": platform.python_version(),
            "host": platform.node()}


def read(k: str) -> dict[str, Any] | None:
    try:
        return json.loads(_path(k).read_text())
    except (OSError, ValueError):
        return None


def write(k: str, facts: dict[str, Any]) -> None:
    """Keep `facts` under `k` unless it holds a problem; never fails the plan."""
    if has_problem(facts):
        return
    path = _path(k)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
            json.dump(facts, fh)
        os.replace(fh.name, path)  # whole or not at all, for a plan reading beside this one
        kept = sorted(path.parent.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in kept[:-KEPT]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def has_problem(facts: dict[str, Any]) -> bool:
    """An error anywhere in the answer: a model, one of its adapter settings, or a dataset."""
    for entry in facts.get("models", {}).values():
        if "error" in entry or any("error" in a for a in entry.get("adapters", {}).values()):
            return True
    return any("error" in entry for entry in facts.get("data", {}).values())


def _path(k: str) -> Path:
    return cache_root() / "facts" / f"{k}.json"


def _versions() -> dict[str, str | None]:
    return library_versions(LIBRARIES)


def _code() -> str:
    """This checkout's code and catalogs (what reads the model, and the presets it reads)."""
    h = hashlib.sha256()
    for path in sorted([*(REPO_ROOT / "steps").rglob("*.py"), *CONFIGS_DIR.rglob("*.yaml")]):
        h.update(str(path.relative_to(REPO_ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _named(value: Any) -> set[str]:
    """Every string in the query that is a local path or a Hub id, and the presets' sources."""
    from steps.plan import catalog

    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= _named(v)
    elif isinstance(value, list):
        for v in value:
            found |= _named(v)
    elif isinstance(value, str) and value:
        preset = catalog.model_presets().get(value)
        if preset is not None:
            found |= {s for s in (preset.source, preset.tokenizer) if s and _HUB_ID.match(s)}
        elif os.path.exists(value) or _HUB_ID.match(value):
            found.add(value)
    return found


def _fingerprint(name: str) -> Any:
    """A local file or folder: its files' sizes and modification times; a Hub id: those of its
    copies in the Hugging Face cache, as a model and as a dataset (None where there is none)."""
    if not os.path.isabs(name) and (REPO_ROOT / name).exists():  # as the facts' process (cwd: the checkout) reads it
        return {"here": _fingerprint(os.path.abspath(name)) if os.path.exists(name) else None,
                "checkout": _fingerprint(str(REPO_ROOT / name))}
    path = Path(name)
    if not path.exists():
        home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
        hub = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
        copies = {kind: hub / f"{kind}--{name.replace('/', '--')}" for kind in ("models", "datasets")}
        return {kind: _fingerprint(str(copy)) for kind, copy in copies.items() if copy.exists()} or None
    if path.is_file():
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]
    files = []
    for root, _, names in os.walk(path):
        for n in names:
            p = os.path.join(root, n)
            try:
                stat = os.stat(p)
            except OSError:
                continue
            files.append([os.path.relpath(p, path), stat.st_size, stat.st_mtime_ns])
            if len(files) >= FILES_PER_FOLDER:
                return sorted(files)
    return sorted(files)
