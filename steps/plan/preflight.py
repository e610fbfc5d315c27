"""What a matrix gets wrong that its schema cannot see, found before any cell starts: models
that cannot be found, adapter targets that match nothing, sequences longer than the model's
context, data files that are missing or do not parse, a GPU instance under `compute: local` on
a machine without that GPU. Each distinct model, adapter setting and dataset is checked once,
not once per cell, and every problem is reported together (a `ConfigError`, like the schema's).

The model facts come from `python -m steps.trainer.facts` (the model built on the meta device,
the adapter applied by PEFT) in a subprocess, so that planning imports no torch. Facts also
turn into refusals (`skipped` cells with the reason), see `compat.model_refusal`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from steps.plan import catalog, compat, facts_cache
from steps.plan import data_sources as sources
from steps.plan.compat import adapter_key
from steps.plan.schema import CellSpec, ConfigError, DataSettings, MatrixSpec, PlannedCell

REPO_ROOT = Path(__file__).resolve().parents[2]
FACTS_TIMEOUT_S = 900
FILE_TASKS = ("instructions", "chat", "classification", "text")


def data_key(cell: CellSpec) -> str:
    """Cells that read the same rows: their data settings, sequence length and tokenizer."""
    return json.dumps([cell.data.model_dump(mode="json"), cell.seq_len, cell.model, cell.train.tokenizer],
                      sort_keys=True)


def gather_facts(cells: list[CellSpec]) -> dict[str, Any]:
    """`steps.trainer.facts` on one cell per distinct (model, adapter setting) and per distinct
    dataset as a cell reads it (`data_key`); the same question asked again is answered from this
    machine's cache (`steps.plan.facts_cache`)."""
    seen: dict[tuple, CellSpec] = {}
    for cell in cells:
        seen.setdefault((cell.model, cell.train.init, cell.train.trust_remote_code, adapter_key(cell)), cell)
        seen.setdefault(("data", data_key(cell)), cell)
    cells_json = [c.model_dump(mode="json") for c in seen.values()]
    kept = facts_cache.key(cells_json) if facts_cache.enabled() else None
    if kept and (facts := facts_cache.read(kept)) is not None:
        return facts
    with tempfile.TemporaryDirectory(prefix="finetune-matrix-facts-") as tmp:
        query, answer = Path(tmp, "cells.json"), Path(tmp, "facts.json")
        query.write_text(json.dumps(cells_json))
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        proc = subprocess.run([sys.executable, "-m", "steps.trainer.facts", str(query), str(answer)],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=FACTS_TIMEOUT_S)
        if proc.returncode != 0 or not answer.exists():
            raise RuntimeError(f"reading the models' facts failed (steps.trainer.facts):\n{proc.stderr[-3000:]}")
        facts = json.loads(answer.read_text())
    if kept:
        facts_cache.write(kept, facts)
    return facts


def model_problems(planned: list[PlannedCell], models: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for name, entry in models.items():
        if "error" in entry:
            problems.append(f"models: {name!r} cannot be loaded: {entry['error']}")
    said: set[tuple] = set()
    for p in planned:
        cell, entry = p.cell, models.get(p.cell.model, {})
        if "error" in entry or not entry:
            continue
        adapter = entry["adapters"].get(adapter_key(cell), {})
        if "error" in adapter and ("lora", cell.model, adapter_key(cell)) not in said:
            said.add(("lora", cell.model, adapter_key(cell)))
            problems.append(
                f"train.lora.target_modules: {cell.train.lora.target_modules!r} on {cell.model} "
                f"({entry['model_type']}): {adapter['error']}; its linear layers are "
                f"{', '.join(entry['linear_names'])} (or use all-linear, or leave it unset for PEFT's default)")
        context = entry.get("context")
        if context and cell.seq_len > context and ("seq_len", cell.model, cell.seq_len) not in said:
            said.add(("seq_len", cell.model, cell.seq_len))
            problems.append(f"seq_len: {cell.seq_len} is longer than the context of {cell.model} "
                            f"({context} tokens); use seq_len <= {context}")
    return problems


def data_problems(planned: list[PlannedCell], rows: dict[str, Any] | None = None,
                  broken_models: set[str] = frozenset()) -> list[str]:
    """Each distinct data file read once, by the code the trainer reads it with; then what each
    dataset gives the cells that read it (`rows`: the facts' counts, `steps.trainer.facts`)
    against one global batch, so that a cell never starts on data it cannot fill a step with
    (not for cells whose model cannot be loaded: their tokenizer's count would mislead)."""
    problems: list[str] = []
    seen: set[str] = set()
    unread: set[str] = set()  # data already reported
    for p in planned:
        data: DataSettings = p.cell.data
        key = data.model_dump_json()
        if key in seen or data.task not in FILE_TASKS:
            continue
        seen.add(key)
        before = len(problems)
        if not data.path:
            problems.append(f"data.path: task {data.task!r} reads a file or folder, and data.path is not set")
        elif not Path(data.path).exists():
            problems.append(f"data.path: {data.path!r} does not exist (task {data.task!r}); give the file "
                            f"or folder, absolute or relative to {Path.cwd()}")
        else:
            try:
                if data.task == "text":
                    Path(data.path).read_text(encoding="utf-8")
                else:
                    sources.load_pairs(data, p.cell.seq_len)
            except (ValueError, KeyError, OSError, UnicodeDecodeError) as exc:
                problems.append(f"data.path: {exc}")
        if len(problems) > before:
            unread.add(key)
    counted = [p for p in planned if p.cell.data.model_dump_json() not in unread and p.cell.model not in broken_models]
    return problems + _row_problems(counted, rows or {})


def _rows(cell: CellSpec, rows: dict[str, Any]) -> dict[str, Any] | None:
    """What the trainer will have: the facts' count, or synthetic data's own size."""
    if (found := rows.get(data_key(cell))) is not None:
        return found
    data = cell.data
    if data.task in sources.SYNTHETIC_TASKS and not data.packing:
        return {"train": data.train_samples or sources.SYNTHETIC_DEFAULT_SAMPLES[0],
                "val": data.val_samples or sources.SYNTHETIC_DEFAULT_SAMPLES[1]}
    return None


def _what(data: DataSettings) -> str:
    return f"data.path: {data.path!r}" if data.path else f"data.train_samples: {data.train_samples} ({data.task})"


def _row_problems(planned: list[PlannedCell], rows: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    short: dict[str, list[CellSpec]] = {}
    said: set[str] = set()
    for p in planned:
        cell = p.cell
        found = _rows(cell, rows)
        if p.refused or found is None:
            continue
        key, what = data_key(cell), _what(cell.data)
        if "error" in found:
            if key not in said:
                problems.append(f"{what} at seq_len {cell.seq_len}: {found['error']}")
            said.add(key)
        elif found["train"] == 0:
            if key not in said:
                held = found.get("val") or 0
                problems.append(f"{what} holds no " + (
                    f"training records: its {held} went to validation (data.val_fraction={cell.data.val_fraction})"
                    if held else "records") + "; give it examples, or point data.path at the file that has them")
            said.add(key)
        elif found["train"] < cell.global_batch:
            short.setdefault(key, []).append(cell)
        elif cell.train.evaluate and found.get("val") == 0 and key + "val" not in said:
            said.add(key + "val")
            problems.append(f"{what} leaves no validation rows; give the validation split examples, or set "
                            f"train.evaluate: false")
    for cells in short.values():
        cell, found = cells[0], _rows(cells[0], rows)
        batches = sorted({c.global_batch for c in cells})
        worst = max(cells, key=lambda c: c.global_batch)
        how = (f"{worst.micro_batch} micro-batch x {worst.grad_accum} accumulation x {worst.dp_size} "
               f"data-parallel rank(s)")
        cut = []
        if cell.data.path and cell.data.task != "text" and Path(cell.data.path).is_file():
            cut.append(f"{found.get('val', '?')} held out for validation by data.val_fraction={cell.data.val_fraction}")
        if cell.data.packing or cell.data.task == "text":
            cut.append(f"rows of seq_len={cell.seq_len} tokens")
        if cell.data.train_samples is not None and found["train"] >= cell.data.train_samples:
            cut.append(f"data.train_samples={cell.data.train_samples}")
        after = f" ({'; '.join(cut)})" if cut else ""
        problems.append(
            f"{_what(cell.data)} gives {found['train']} training row(s){after}, fewer than one global batch of "
            f"{len(cells)} cell(s): {', '.join(map(str, batches))} rows (the largest: {how}); add examples, or "
            f"lower micro_batch, grad_accum or gpus so that a step takes at most {found['train']}")
    return problems


def machine_problems(spec: MatrixSpec, machine: dict[str, Any]) -> list[str]:
    """Under `compute: local` the cells run here: a GPU instance type needs its GPUs here."""
    if spec.compute != "local":
        return []
    problems = []
    gpus = machine.get("gpus", [])
    for name in spec.instance:
        instance = catalog.instances().get(name)
        if instance is not None and instance.local_gpu:
            if not instance.devices_per_node:  # cells needing more GPUs than there are: compat.devices_fit
                problems.append("instance: local-gpu trains on this machine's NVIDIA GPUs, and nvidia-smi finds "
                                "none; use instance: local-cpu (or instance: local, which picks) to train on the CPU")
            continue
        if instance is None or instance.local or instance.devices_per_node == 0:
            continue
        family = instance.accelerator.removeprefix("NVIDIA ").split()[0].split("-")[0].lower()  # "v100"
        matching = [g for g in gpus if family in g.lower().replace("-", " ").split()]
        needed = max(spec.gpus)
        if len(matching) < min(needed, instance.devices_per_node):
            here = f"{len(gpus)} GPU(s): {', '.join(gpus)}" if gpus else "no GPU"
            problems.append(
                f"instance: {name} ({instance.accelerator}) with compute: local would train on this "
                f"machine, which has {here}; use compute: sagemaker (or kubernetes, batch, slurm) to run on "
                f"{name}, or instance: {'local-gpu' if gpus else 'local-cpu'} to train here")
    return problems


def check(spec: MatrixSpec, planned: list[PlannedCell], facts: dict[str, Any] | None = None) -> list[PlannedCell]:
    """The planned cells, with the refusals the models' facts add; a `ConfigError` listing every
    problem if there is any."""
    facts = facts if facts is not None else gather_facts([p.cell for p in planned])
    models = facts["models"]
    broken = {name for name, entry in models.items() if "error" in entry}  # said once, as the model's
    problems = (model_problems(planned, models) + data_problems(planned, facts.get("data"), broken)
                + machine_problems(spec, facts.get("machine", {})))
    if problems:
        raise ConfigError(problems, spec.name)
    return [p if p.refused else replace(p, refused=compat.model_refusal(p.cell, models.get(p.cell.model)))
            for p in planned]
