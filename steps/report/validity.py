"""What a run can and cannot say about the scale it stands in for, from its results table alone.

A CPU twin of a GPU study, a model of a few million parameters, random weights, a few dozen
steps or a memory cap each make some comparisons of the report this run's only: a reader who
takes a CPU twin's memory ratios, bf16 speed-up or best learning rate to an H100 run of a 7B model
is misled. The note names which comparisons do not transfer, and why, with the cells' facts; a
run of pretrained models of 1B parameters or more, on GPUs, long enough and uncapped, gets none.
It also names the cells that ran on a busy machine (`settings.contended`), wherever they ran.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from steps.plan import catalog
from steps.plan.settings import CONTENDED_SHARE, contended
from steps.report import decision
from steps.report.render import Block

TITLE = "## What this run can and cannot tell"
MIN_PARAMS = 1e9  # models below this (`total_params`) do not speak for a billion-parameter target
MIN_STEPS = 100  # nor do runs of fewer optimizer steps (`total_steps`) for a learning rate or a quality
SHOWN_CELLS = 5  # cell ids named in a line, the rest counted
BUSY = "**Speed on a busy machine**"


def note(df: pd.DataFrame) -> str | None:
    """The section's Markdown: one line per comparison that does not transfer; None where the
    run can speak for its target (GPUs, >=1B pretrained, enough steps, no cap, no busy machine)."""
    ran = df[df["outcome"].astype(str) != "skipped"] if "outcome" in df else df
    if ran.empty:
        return None
    cpu = _on_cpu(ran)
    lines = [line for line in (_memory(ran, cpu), _precision(ran, cpu), _strategy(ran, cpu), _scale(ran),
                               _quality(ran), _ooms(ran), _busy(ran)) if line]
    if not lines:
        return None
    busy = " or were measured on a busy machine" if lines[-1].startswith(BUSY) else ""
    lead = ("Every number below holds for this run as it ran; these comparisons do not carry over to the "
            f"scale it stands in for (GPUs, pretrained models of {_count(MIN_PARAMS)} parameters or more, "
            f"{MIN_STEPS} optimizer steps or more, no memory cap){busy}:")
    return f"{TITLE}\n\n{lead}\n\n" + "\n".join(f"- {line}" for line in lines)


def blocks(df: pd.DataFrame) -> list[Block]:
    """The note as report blocks: none where the run needs no note."""
    text = note(df)
    return [Block("text", text)] if text else []


# ---------------------------------------------------------------- the cells' facts

def _col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series([None] * len(df), index=df.index, dtype=object)


def _on_cpu(df: pd.DataFrame) -> pd.Series:
    """Cells whose devices were CPU processes: a local CPU instance, or a device the trainer
    found to be a CPU (a GPU instance type that found no GPU)."""
    instance = _col(df, "instance").astype(str).str.startswith("local-cpu")
    device = _col(df, "device").astype(str).str.lower().str.startswith("cpu")
    return instance | device


def _random(row: Any) -> bool | None:
    """Whether the cell's model had random weights, as the trainer decides it (`train.init`, and
    under `auto` the preset's default); None where the table does not record `train.init`."""
    init = row.get("train.init")
    if not isinstance(init, str):
        return None
    if init != "auto":
        return init == "random"
    preset = catalog.model_presets().get(str(row.get("model")))
    return preset is not None and preset.init == "random"


def _steps(df: pd.DataFrame) -> pd.Series:
    """The optimizer steps each cell was set to train (what it trained where the plan is not recorded)."""
    planned = pd.to_numeric(_col(df, "total_steps"), errors="coerce")
    return planned.fillna(pd.to_numeric(_col(df, "train_steps"), errors="coerce"))


def _count(n: float) -> str:
    """A parameter count: 0.154M, 30.7M, 7B."""
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def _span(values: pd.Series, show) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    low, high = show(values.min()), show(values.max())
    return low if low == high else f"{low}-{high}"


def _gb(x: float) -> str:
    return f"{x:.2f}"


def _of(n: int, total: int, what: str) -> str:
    return f"{'all ' if n == total and n > 1 else ''}{n}{'' if n == total else f' of {total}'} {what}"


def _cells(df: pd.DataFrame) -> str:
    ids = [f"`{c}`" for c in df["cell_id"].astype(str)]
    more = len(ids) - SHOWN_CELLS
    return ", ".join(ids[:SHOWN_CELLS]) + (f" and {more} more" if more > 0 else "")


def _cores(df: pd.DataFrame) -> str:
    """The CPU cores the device names give ("cpu (x86_64, 2 cores)"), e.g. " on a 2-core machine"."""
    found = sorted({int(m.group(1)) for d in _col(df, "device").astype(str) if (m := re.search(r"(\d+) cores", d))})
    return f" on a {'/'.join(map(str, found))}-core machine" if found else ""


# ---------------------------------------------------------------- one line per comparison

def _memory(df: pd.DataFrame, cpu: pd.Series) -> str | None:
    """CPU cells: a process's resident set holds its libraries before the model."""
    if not cpu.any():
        return None
    cells = df[cpu]
    base = pd.to_numeric(_col(cells, "runtime_baseline_gb"), errors="coerce")
    peak = pd.to_numeric(_col(cells, "peak_mem_gb"), errors="coerce")
    own = (peak - base)[base.notna() & peak.notna()]
    held = (f"held {_span(base, _gb)} GB of libraries before the model (`runtime_baseline_gb`), against "
            f"{_span(own, _gb)} GB for the training itself (`peak_mem_gb` minus it)" if len(own)
            else "holds hundreds of MB of libraries before the model")
    return (f"**Memory ratios**: {_of(int(cpu.sum()), len(df), 'cells')} ran as CPU processes, whose resident set "
            f"{held}: ratios of whole peaks between cells shrink toward 1 and say nothing of a GPU's; compare "
            "peak minus baseline.")


def _precision(df: pd.DataFrame, cpu: pd.Series) -> str | None:
    """bf16 on a CPU: its vector units, emulated where they have no bf16 instructions."""
    bf16 = cpu & _col(df, "precision").astype(str).str.contains("bf16")
    if not bf16.any():
        return None
    return (f"**Precision**: {_of(int(bf16.sum()), len(df), 'cells')} ran bf16 on a CPU, where it is emulated "
            "unless the CPU has native bf16 units: their speed and memory against fp32 say nothing of a GPU's "
            "tensor cores.")


def _strategy(df: pd.DataFrame, cpu: pd.Series) -> str | None:
    """Several ranks on a CPU: processes sharing cores over gloo, not GPUs over NVLink and NCCL."""
    ranks = pd.to_numeric(_col(df, "world_size"), errors="coerce")
    multi = cpu & (ranks > 1)
    if not multi.any():
        return None
    return (f"**Strategy speed**: {_of(int(multi.sum()), len(df), 'cells')} ran {_span(ranks[multi], _int)} ranks "
            f"as CPU processes sharing cores{_cores(df[multi])} and talking over gloo: their scaling and the "
            "strategies' speed measure that, not GPUs over NVLink and NCCL.")


def _int(x: float) -> str:
    return f"{x:.0f}"


def _small(df: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(_col(df, "total_params"), errors="coerce") < MIN_PARAMS


def _models(df: pd.DataFrame, named: bool = True) -> str:
    """"models of 0.154M-31.4M parameters (llama-debug, llama-30m)"; "a model of ..." for one."""
    names = list(dict.fromkeys(df["model"].astype(str))) if "model" in df else []
    what = "a model" if len(names) == 1 else "models"
    return (f"{what} of {_span(df['total_params'], _count)} parameters"
            + (f" ({', '.join(names)})" if names and named else ""))


def _scale(df: pd.DataFrame) -> str | None:
    """Small models: weights, activations and per-step costs in other proportions than at scale."""
    small = _small(df)
    if not small.any():
        return None
    return (f"**Speed at scale**: {_of(int(small.sum()), len(df), 'cells')} trained {_models(df[small])}, whose "
            f"weights, activations and fixed per-step costs stand in other proportions than a {_count(MIN_PARAMS)}+ "
            "model's: speed and memory ratios between methods, strategies and precisions need not hold there.")


def _quality(df: pd.DataFrame) -> str | None:
    """Small or random models and short runs: the learning rate and the quality do not transfer."""
    small = _small(df)
    randoms = [_random(r) for _, r in df.iterrows()]
    random = pd.Series([r is True for r in randoms], index=df.index)
    steps = _steps(df)
    few = steps < MIN_STEPS
    why = []
    if small.any():
        why.append(_models(df[small], named=False))
    if random.any():
        why.append(f"{'' if random.all() else _of(int(random.sum()), len(df), 'cells') + ' with '}random weights")
    if few.any():
        why.append(f"{'' if few.all() else _of(int(few.sum()), len(df), 'cells') + ' of '}"
                   f"{_span(steps[few], _int)} optimizer steps")
    if not why:
        return None
    ok = df[df["outcome"].astype(str) == "ok"] if "outcome" in df else df.iloc[:0]
    unlearned = sum(decision.not_learned(r) is not None for _, r in ok.iterrows())
    learned = f" ({_of(unlearned, len(ok), 'finished cells')} did not learn)" if unlearned else ""
    return (f"**Learning rate and quality**: {'; '.join(why)}{learned}: they cannot learn what a pretrained "
            f"{_count(MIN_PARAMS)}+ model would (LoRA least of all), so the best learning rate, the validation-loss "
            "ranking and the methods' quality do not carry over.")


def _ooms(df: pd.DataFrame) -> str | None:
    """A memory cap: its OOMs are the cap's, not a device's."""
    cap = pd.to_numeric(_col(df, "train.memory_cap_gb"), errors="coerce")
    capped = cap.notna()
    if not capped.any():
        return None
    oom = capped & (_col(df, "outcome").astype(str) == "oom")
    limit = f"{_span(cap[capped], lambda x: f'{x:g}')} GB per process (`train.memory_cap_gb`)"
    what = (f"{_of(int(oom.sum()), int(capped.sum()), 'capped cells')} ran out of memory ({_cells(df[oom])})"
            if oom.any() else "none of the capped cells ran out of memory")
    return (f"**OOMs**: {_of(int(capped.sum()), len(df), 'cells')} ran under a cap of {limit}; {what}: which "
            "configurations fit is the cap's answer, not a GPU's.")


def _busy(df: pd.DataFrame) -> str | None:
    """Cells whose cores other processes kept busy: their speed measured the contention too."""
    share = _col(df, "other_cpu_share")
    busy = share.map(contended).astype(bool)
    if not busy.any():
        return None
    return (f"{BUSY}: {_of(int(busy.sum()), len(df), 'cells')} ran while other processes "
            f"used more than {CONTENDED_SHARE:.0%} of their cores (`other_cpu_share` "
            f"{_span(share[busy], lambda x: f'{x:.2f}')}): {_cells(df[busy])}. Their speed, time and cost measured "
            "the contention as well, and the calibration store leaves them out.")

