"""The comparisons the reference studies made by hand, each computed from the results table.

Every function takes the table (one row per cell, `steps/results.py`) and returns a small
DataFrame that the report renders and the findings quote. Only cells whose outcome is `ok`
enter a number; the others are listed by `cells` with their outcome, never dropped.

A comparison row is one configuration at its best learning rate (`best_rows`): one cell, or the
mean of its repeats, so that its speed, memory and loss come from the same cells (`cell_id`).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from steps.plan import catalog
from steps.plan.settings import RUN_LIMITS

# Axes that make two cells "the same configuration" apart from the one being compared; with
# them, every train.* / data.* setting that differs between cells of the table.
CONFIG = ["model", "peft", "strategy", "instance", "world_size", "micro_batch", "grad_accum",
          "precision", "seq_len"]
LEARNED_DROP = 0.05  # a cell learned when its final training loss is 5% or more below its first
SMOOTH_WINDOW = 5  # training-loss points averaged for time-to-target and loss-at-tokens
NUMERIC = ["lr", "world_size", "nodes", "gpus", "micro_batch", "grad_accum", "global_batch",
           "seq_len", "tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb",
           "val_loss", "accuracy", "wall_s", "train_s", "cost_usd", "epoch_s", "step_s",
           "train_tokens", "target_loss", "time_to_target_s", "tokens_to_target", "steps_to_target",
           "stopped_after_steps", "total_steps", "train_steps", "eval_s", "runtime_baseline_gb"]
# A speed cell's (`economy:`) time and cost as run, before `prepare` projects them to its full run.
AS_RUN = {"train_s": "ran_train_s", "wall_s": "ran_wall_s", "cost_usd": "ran_cost_usd"}
# What tells the repeats of one configuration apart: never part of a configuration.
REPEAT_KEYS = ("repeat", "train.seed")
# Measurements a configuration's repeats are averaged on.
MEANS = ["tokens_per_s", "tokens_per_s_per_device", "mfu", "peak_mem_gb", "runtime_baseline_gb", "train_mem_gb",
         "val_loss", "accuracy", "wall_s", "train_s", "epoch_s", "step_s", "cost_usd", "cost_per_mtok",
         "train_tokens"]
MEMORY_LABEL = {"train_mem_gb": "training memory", "peak_mem_gb": "peak memory"}


def varying_settings(df: pd.DataFrame) -> list[str]:
    """The train.* / data.* columns whose value differs between cells (run limits aside): what
    tells apart cells with equal axes (a LoRA-rank sweep, an SGD variant)."""
    names = [c for c in df.columns if c.startswith(("train.", "data.")) and c not in RUN_LIMITS + REPEAT_KEYS]
    return [c for c in names if df[c].astype(str).nunique() > 1]


def setting_text(name: str, value: Any) -> str:
    """'lora.r=16': a train/data setting as the report names it."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{name.partition('.')[2]}={'-' if value is None or value != value else value}"


def config_keys(df: pd.DataFrame, *varying: str) -> list[str]:
    """The columns that make a configuration, less the `varying` ones."""
    return [c for c in CONFIG + varying_settings(df) if c not in varying]


def by_config(df: pd.DataFrame, *varying: str):
    """(settings, cells) for each configuration, cells differing only in the `varying` axes or
    settings (and the learning rate and seed, which are not part of it). A missing setting (NaN)
    is still a configuration of its own."""
    if df.empty:
        return
    keys = config_keys(df, *varying)
    for key, g in df.groupby(keys, dropna=False, sort=True):
        yield dict(zip(keys, key)), g


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Missing columns as NaN, numbers as numbers, cost from the instance catalog (so a price
    change reprices old runs), cost per million trained tokens, training memory (`train_mem_gb`:
    the peak less what the runtime held before the model; NaN without that baseline), the batch
    as 'micro-batch x accumulation', whether each finished cell learned, and a speed cell's time
    and cost projected to its full run (`project_speed_cells`)."""
    df = df.copy().reset_index(drop=True)
    for col in NUMERIC + ["outcome", "error", "loss_curve", "val_curve", "run_id", "cell_id"]:
        if col not in df.columns:
            df[col] = np.nan
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    known = catalog.instances()
    df["price_per_hour_usd"] = [known[i].price_per_hour_usd if i in known else np.nan for i in df["instance"]]
    priced = [catalog.cost_usd(r.instance, r.wall_s, int(r.nodes), int(r.world_size))
              if r.instance in known and pd.notna(r.wall_s) and r.outcome != "skipped" else None
              for r in df[["instance", "wall_s", "nodes", "world_size", "outcome"]].itertuples()]
    df["cost_usd"] = [c if c is not None else old for c, old in zip(priced, df["cost_usd"])]
    finished = (df["outcome"] == "ok") & (df["train_tokens"] > 0)
    df["cost_per_mtok"] = np.where(finished, df["cost_usd"] / (df["train_tokens"] / 1e6), np.nan)
    df["train_mem_gb"] = df["peak_mem_gb"] - df["runtime_baseline_gb"]
    df["mb_ga"] = [f"{int(m)} x {int(g)}" if pd.notna(m) and pd.notna(g) else None
                   for m, g in zip(df["micro_batch"], df["grad_accum"])]
    df["learned"] = [learned(r) for _, r in df.iterrows()]
    return project_speed_cells(df)


def learned(row: Any) -> str | None:
    """'yes', or 'no: <why>' (`not_learned`), for a finished cell; None for the others."""
    if row.get("outcome") != "ok":
        return None
    why = not_learned(row)
    return "yes" if why is None else "no: " + why.removeprefix("did not learn: ")


def memory_column(*rows: Any) -> str:
    """The memory to compare rows on: training memory where every row has it, else the peak."""
    return "train_mem_gb" if all(pd.notna(r.get("train_mem_gb")) for r in rows) else "peak_mem_gb"


def project_speed_cells(df: pd.DataFrame) -> pd.DataFrame:
    """Under `economy:`, every table compares configurations trained to the end: a speed cell's
    train s, wall s and cost become its full run's, its measured time plus the steps it skipped
    at its own measured step time (and, for wall and cost, its class's evaluation, which it
    skipped too). What it spent stays in `ran_train_s`, `ran_wall_s`, `ran_cost_usd`."""
    if "quality_from" not in df or AS_RUN["wall_s"] in df:
        return df
    df = df.assign(**{ran: df[col] for col, ran in AS_RUN.items()})
    speed = df["quality_from"].notna() & (df["outcome"] == "ok")
    if not speed.any():
        return df
    skipped = ((df["total_steps"] - df["train_steps"]).clip(lower=0) * df["step_s"]).where(speed, 0.0)
    evals = df["quality_from"].map(df.set_index("cell_id")["eval_s"]).fillna(0.0).where(speed, 0.0)
    df["train_s"] = df["train_s"] + skipped
    df["wall_s"] = df["ran_wall_s"] + skipped + evals
    df["cost_usd"] = df["ran_cost_usd"] * df["wall_s"] / df["ran_wall_s"]
    return df


def ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["outcome"] == "ok"]


def curve(row: Any, name: str = "loss_curve") -> list[dict[str, Any]]:
    value = row[name] if name in row else None
    if isinstance(value, str) and value:
        return json.loads(value)
    return list(value) if isinstance(value, list) else []


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """Every cell, failures included, in a stable order: the studies' main table."""
    order = ["model", "peft", "strategy", "instance", "world_size", "micro_batch", "lr"]
    return df.sort_values(order, kind="stable").reset_index(drop=True)


def _pool(g: pd.DataFrame) -> pd.DataFrame:
    """The cells a configuration is judged on: its finished cells that learned, or all its
    finished cells where none did."""
    done = ok(g)
    if "learned" not in done:
        return done
    learnt = done[done["learned"] == "yes"]
    return learnt if len(learnt) else done


def best_lr(g: pd.DataFrame) -> float | None:
    """The learning rate a configuration's cells are compared at: the lowest mean val loss of
    `_pool`; where no cell has a val loss, the fastest. None where no cell finished."""
    pool = _pool(g)
    if pool.empty:
        return None
    per = pool.groupby("lr")[["val_loss", "tokens_per_s"]].mean()
    if per["val_loss"].notna().any():
        return float(per["val_loss"].idxmin())
    return float(per["tokens_per_s"].idxmax()) if per["tokens_per_s"].notna().any() else float(per.index[0])


def _best_row(g: pd.DataFrame) -> dict[str, Any]:
    """A configuration's row: the cell at its best learning rate, or the mean of that rate's
    repeats (`members`, `repeats`); with no finished cell, its first cell, the commonest failure
    and no measurements."""
    lr = best_lr(g)
    if lr is None:
        row = g.iloc[0].to_dict()
        return {**row, **{c: np.nan for c in MEANS if c in row}, "outcome": _outcome(g),
                "members": tuple(g["cell_id"]), "repeats": 0, "cell": row["cell_id"]}
    cells = _pool(g)
    cells = cells[cells["lr"] == lr]
    row, n = cells.iloc[0].to_dict(), len(cells)
    if n > 1:
        row.update({c: cells[c].mean() for c in MEANS if c in cells})
    return {**row, "members": tuple(cells["cell_id"]), "repeats": n,
            "cell": str(row["cell_id"]) + (f" (mean of {n})" if n > 1 else "")}


def best_rows(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, at its best learning rate (`_best_row`)."""
    return pd.DataFrame([_best_row(g) for _, g in by_config(df)])


def scaling(df: pd.DataFrame) -> pd.DataFrame:
    """Speedup and scaling efficiency against the smallest GPU count of the same
    configuration, each at its best learning rate. Speedup = tokens/s over the baseline's;
    efficiency = speedup / (GPUs over the baseline's GPUs). A multi-GPU strategy with no 1-GPU
    cell of its own is measured against `single` (one GPU, same configuration otherwise), as
    the studies did."""
    picks = best_rows(ok(df))
    if picks.empty:
        return pd.DataFrame()
    same = [k for k in config_keys(picks) if k not in ("strategy", "world_size", "micro_batch", "grad_accum")]
    singles = picks[picks["strategy"] == "single"]
    rows = []
    for _, g in by_config(picks, "world_size"):
        g = g.sort_values("world_size")
        base = g.iloc[0]
        if base.strategy != "single" and base.world_size > 1:
            single = _single_baseline(singles, base, same)
            base = single if single is not None else base
        if len(g) < 2 and base.strategy == g.iloc[0].strategy:
            continue  # one GPU count and no single-GPU baseline: nothing to compare
        rows += [_scaled(r, base) for _, r in g.iterrows()]
    return pd.DataFrame(rows)


def _scaled(r: pd.Series, base: pd.Series) -> dict[str, Any]:
    """One row of the scaling table: the configuration against its baseline."""
    speedup = r.tokens_per_s / base.tokens_per_s
    batch = (f" (micro-batch {int(base.micro_batch)} x {int(base.grad_accum)})"
             if (base.micro_batch, base.grad_accum) != (r.micro_batch, r.grad_accum) else "")
    return {**r.to_dict(), "world_size": int(r.world_size), "base": f"{base.strategy} x{int(base.world_size)}{batch}",
            "base_world_size": int(base.world_size), "base_tokens_per_s": base.tokens_per_s,
            "base_members": base.members, "base_cell": base.cell_id, "speedup": speedup,
            "epoch_speedup": base.epoch_s / r.epoch_s, "efficiency": speedup / (r.world_size / base.world_size)}


def _single_baseline(singles: pd.DataFrame, base: pd.Series, keys: list[str]) -> pd.Series | None:
    """The one-GPU cell to measure a multi-GPU strategy against: equal in `keys`, and the same
    per-GPU batch (weak scaling, as studies 1-4 did), else the same global batch (strong
    scaling, study 5)."""
    same = singles
    for k in keys:
        same = same[(same[k] == base[k]) | (same[k].isna() & pd.isna(base[k]))]
    weak = same[(same["micro_batch"] == base["micro_batch"]) & (same["grad_accum"] == base["grad_accum"])]
    strong = same[same["global_batch"] == base["global_batch"]]
    pick = weak if len(weak) else strong
    return pick.iloc[0] if len(pick) else None


def _outcome(g: pd.DataFrame) -> str:
    """ok if any cell finished, else the commonest failure (oom, hang, ...)."""
    if (g["outcome"] == "ok").any():
        return "ok"
    return str(g["outcome"].mode().iloc[0])


def _across(df: pd.DataFrame, axis: str, order: dict[str, int] | None = None) -> list[list[dict[str, Any]]]:
    """For each configuration run at two or more values of `axis` (skipped cells left out):
    one row per value, in `order`, each that configuration at its best learning rate
    (`best_rows`), with its outcome."""
    picks = best_rows(df[df["outcome"] != "skipped"])
    groups = []
    for _, g in by_config(picks, axis):
        if g[axis].nunique() < 2:
            continue
        values = sorted(g.groupby(axis, sort=True), key=lambda x: (order or {}).get(x[0], 9))
        groups.append([r.to_dict() for _, m in values for _, r in m.iterrows()])
    return groups


def _relative(groups: list[list[dict[str, Any]]], pick, suffix: str) -> pd.DataFrame:
    """Each row's memory (`memory_column`) and tokens/s over those of its group's reference row."""
    rows = []
    for group in groups:
        ref = pick(group) or {}
        for r in group:
            mem = memory_column(r, ref) if ref else "peak_mem_gb"
            r[f"mem_vs_{suffix}"] = r[mem] / ref[mem] if ref else np.nan
            r[f"tokens_per_s_vs_{suffix}"] = r["tokens_per_s"] / ref["tokens_per_s"] if ref else np.nan
            rows.append(r)
    return pd.DataFrame(rows)


def methods(df: pd.DataFrame) -> pd.DataFrame:
    """Full vs LoRA vs QLoRA (vs DoRA) on the same configuration: memory and tokens/s, and their
    ratios to LoRA's. Configurations where fewer than two methods ran are left out."""
    groups = _across(df, "peft", {"full": 0, "lora": 1, "dora": 2, "qlora": 3})
    return _relative(groups, lambda g: next((r for r in g if r["peft"] == "lora"), None), "lora")


def instances(df: pd.DataFrame) -> pd.DataFrame:
    """Time and cost of the same configuration on each instance type, where a configuration ran
    on at least two."""
    return pd.DataFrame([r for group in _across(df, "instance") for r in group])


def precisions(df: pd.DataFrame) -> pd.DataFrame:
    """The same configuration at two or more precisions (bf16-true vs bf16-mixed, fp32 ...):
    memory, tokens/s and val loss, with memory and speed relative to the first listed."""
    groups = _across(df, "precision", {"fp32": 0, "fp16-mixed": 1, "bf16-mixed": 2, "bf16-true": 3})
    return _relative(groups, lambda g: g[0], "first")


def settings(df: pd.DataFrame) -> pd.DataFrame:
    """The same configuration at two or more values of a swept train/data setting (LoRA rank,
    optimizer, gradient checkpointing ...): memory, tokens/s and val loss per value, with
    memory and speed relative to the first value. `train.fault` (failures on purpose) is left out."""
    tables = []
    swept = varying_settings(df)
    for name in swept:
        if name.startswith("train.fault."):
            continue
        others = [k for k in swept if k != name]
        groups = [[{**r, "setting": name, "value": r[name], "group": i,
                    "others": " ".join(setting_text(k, r[k]) for k in others)}
                   for r in group] for i, group in enumerate(_across(df, name))]
        if groups:
            tables.append(_relative(groups, lambda g: g[0], "first"))
    return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()


def instance_totals(df: pd.DataFrame) -> pd.DataFrame:
    """What each instance type ran and what it cost in all (failed cells cost too)."""
    ran = df[df["outcome"] != "skipped"]
    rows = []
    for inst, g in df.groupby("instance"):
        r = ran[ran["instance"] == inst]
        entry = catalog.instances().get(inst)
        rows.append({"instance": inst, "accelerator": entry.accelerator if entry else None,
                     "price_per_hour_usd": g["price_per_hour_usd"].iloc[0],
                     "cells": len(g), "ok": int((g["outcome"] == "ok").sum()),
                     "wall_s": r["wall_s"].sum(), "cost_usd": r["cost_usd"].sum(min_count=1)})
    return pd.DataFrame(rows)


def _learned_of(m: pd.DataFrame) -> str | None:
    """'yes' where every finished cell learned, else the first one's reason; None if none finished."""
    said = [v for v in ok(m).get("learned", pd.Series(dtype=object)) if isinstance(v, str)]
    return next((v for v in said if v != "yes"), "yes" if said else None)


def lr_sweep(df: pd.DataFrame) -> pd.DataFrame:
    """Validation loss per learning rate (the mean of its repeats) for each configuration tried
    at two or more rates; `best` marks the rate the comparisons use (`best_lr`: cells that did
    not learn only where none did), `at_edge` a best rate at the end of the grid tried (the true
    optimum may lie beyond it)."""
    rows = []
    for key, g in by_config(df):
        good = ok(g).groupby("lr")["val_loss"].mean()
        if good.notna().sum() < 2:
            continue
        tried = sorted(g["lr"].unique())
        best = best_lr(g)
        for lr in tried:
            m = g[g["lr"] == lr]
            rows.append({**key, "global_batch": int(m["global_batch"].iloc[0]),
                         "mb_ga": f"{int(key['micro_batch'])} x {int(key['grad_accum'])}",
                         "lr": lr, "val_loss": good.get(lr, np.nan), "outcome": _outcome(m),
                         "learned": _learned_of(m), "members": tuple(ok(m)["cell_id"]),
                         "best": lr == best, "at_edge": lr == best and best in (tried[0], tried[-1])})
    return pd.DataFrame(rows)


def lr_scaling(sweep: pd.DataFrame) -> pd.DataFrame:
    """The exponent k of best_lr ~ global_batch^k (least squares on logs), per model and
    method, where the best rate was found at two or more global batch sizes; the linear rule
    says k = 1, the square-root rule k = 0.5."""
    if sweep.empty:
        return pd.DataFrame()
    best = sweep[sweep["best"]]
    rows = []
    for (model, peft), g in best.groupby(["model", "peft"]):
        if g["global_batch"].nunique() < 2:
            continue
        k, _ = np.polyfit(np.log(g["global_batch"]), np.log(g["lr"]), 1)
        k = float(np.round(k, 4)) + 0.0  # no -0.0
        rule = min((("linear", 1.0), ("square-root", 0.5), ("constant", 0.0)), key=lambda r: abs(k - r[1]))[0]
        rows.append({"model": model, "peft": peft, "points": len(g), "exponent": float(k),
                     "closest_rule": rule, "min_batch": int(g["global_batch"].min()),
                     "max_batch": int(g["global_batch"].max()),
                     "best_lrs": ", ".join(f"{b}:{lr:g}" for b, lr in g.sort_values("global_batch")[
                         ["global_batch", "lr"]].itertuples(index=False)),
                     "any_at_edge": bool(g["at_edge"].any())})
    return pd.DataFrame(rows)


def batch_fit(df: pd.DataFrame) -> pd.DataFrame:
    """Largest micro-batch that trained, and the smallest that did not, per configuration
    tried at two or more micro-batch sizes."""
    rows = []
    for key, g in by_config(df[df["outcome"] != "skipped"], "micro_batch"):
        if g["micro_batch"].nunique() < 2:
            continue
        fit = ok(g)["micro_batch"]
        failed = g[(g["outcome"] != "ok") & (g["micro_batch"] > (fit.max() if len(fit) else 0))]
        first_fail = failed.sort_values("micro_batch").iloc[0] if len(failed) else None
        rows.append({**key, "tried": ", ".join(str(int(b)) for b in sorted(g["micro_batch"].unique())),
                     "cap_gb": first_fail.get("train.memory_cap_gb") if first_fail is not None else None,
                     "largest_ok": int(fit.max()) if len(fit) else None,
                     "peak_mem_gb_at_largest": (ok(g)[ok(g)["micro_batch"] == fit.max()]["peak_mem_gb"].max()
                                                if len(fit) else np.nan),
                     "first_failed": int(first_fail.micro_batch) if first_fail is not None else None,
                     "failed_as": first_fail.outcome if first_fail is not None else None})
    return pd.DataFrame(rows)


def smooth(losses: list[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing mean over up to `window` points (fewer at the start)."""
    out = []
    for i in range(len(losses)):
        part = losses[max(0, i - window + 1): i + 1]
        out.append(sum(part) / len(part))
    return out


def loss_at_tokens(points: list[dict[str, Any]], tokens: float) -> float | None:
    """Mean training loss over the last 10% of the first `tokens` tokens (at least one point)."""
    cum, window, last = 0.0, [], None
    for p in points:
        cum += p["tokens"]
        if cum > tokens * (1 + 1e-9):
            break
        last = p["loss"]
        if cum > 0.9 * tokens:
            window.append(p["loss"])
    if window:
        return sum(window) / len(window)
    return last


def equal_tokens(df: pd.DataFrame) -> pd.DataFrame:
    """Training loss after the same number of tokens, for cells of a configuration that differ
    in micro-batch, gradient accumulation or learning rate: the budget is the fewest tokens
    any of them trained on."""
    rows = []
    for key, g in by_config(ok(df), "micro_batch", "grad_accum"):
        if g[["micro_batch", "grad_accum", "lr"]].drop_duplicates().shape[0] < 2 or g["global_batch"].nunique() < 2:
            continue
        budget = g["train_tokens"].min()
        for _, r in g.sort_values(["global_batch", "lr"]).iterrows():
            rows.append({**key, "micro_batch": int(r.micro_batch), "grad_accum": int(r.grad_accum),
                         "global_batch": int(r.global_batch), "lr": r.lr, "tokens": budget,
                         "loss_at_tokens": loss_at_tokens(curve(r), budget), "val_loss": r.val_loss})
    return pd.DataFrame(rows)


def target_losses(df: pd.DataFrame, window: int = SMOOTH_WINDOW) -> dict[str, float]:
    """Per model: the matrix's train.target_loss where set, else the median of the finished
    cells' final smoothed training losses (half of them reach it: the others are the slow ones)."""
    out = {}
    for model, g in ok(df).groupby("model"):
        if g["target_loss"].notna().any():
            out[model] = float(g["target_loss"].dropna().iloc[0])
            continue
        finals = [smooth([p["loss"] for p in c], window)[-1] for c in (curve(r) for _, r in g.iterrows()) if c]
        if finals:
            out[model] = float(np.median(finals))
    return out


def reach(points: list[dict[str, Any]], target: float, window: int = SMOOTH_WINDOW) -> dict[str, Any] | None:
    """Training time, tokens and steps when the smoothed training loss first reached target."""
    cum = 0.0
    for p, s in zip(points, smooth([p["loss"] for p in points], window)):
        cum += p["tokens"]
        if s <= target:
            return {"time_s": p["time_s"], "tokens": cum, "steps": p["step"]}
    return None


def goodput(df: pd.DataFrame, window: int = SMOOTH_WINDOW) -> pd.DataFrame:
    """Throughput is tokens per second; goodput is useful optimizer updates per second (and
    samples per second); statistical efficiency is time and tokens to the target loss."""
    targets = target_losses(df, window)
    config = config_keys(df)
    g_target_set = {m: bool(g["target_loss"].notna().any()) for m, g in ok(df).groupby("model")}
    rows = []
    for _, r in ok(df).iterrows():
        target = targets.get(r.model)
        from_trainer = pd.notna(r.target_loss) and target == r.target_loss and pd.notna(r.time_to_target_s)
        hit = ({"time_s": r.time_to_target_s, "tokens": r.tokens_to_target, "steps": r.get("steps_to_target")}
               if from_trainer else (reach(curve(r), target, window) if target is not None else None))
        if hit and not from_trainer and pd.notna(r.get("quality_from")):  # the class's curve, this cell's speed
            hit = {**hit, "time_s": hit["steps"] * r.step_s if r.step_s else np.nan}
        rows.append({"cell_id": r.cell_id, **{k: r[k] for k in config}, "lr": r.lr,
                     "target_from": "matrix" if g_target_set.get(r.model) else "median",
                     "global_batch": r.global_batch, "tokens_per_s": r.tokens_per_s,
                     "updates_per_s": 1 / r.step_s if r.step_s else np.nan,
                     "samples_per_s": r.global_batch / r.step_s if r.step_s else np.nan,
                     "target_loss": target, "time_to_target_s": hit["time_s"] if hit else np.nan,
                     "tokens_to_target": hit["tokens"] if hit else np.nan,
                     "steps_to_target": hit["steps"] if hit else np.nan, "train_s": r.train_s,
                     "curve_points": len(curve(r)), "val_loss": r.val_loss, "learned": r.get("learned")})
    return pd.DataFrame(rows)


def pareto(df: pd.DataFrame, objectives: tuple[str, ...] = ("cost_usd", "wall_s", "val_loss")) -> pd.DataFrame:
    """Per model, its finished cells that learned, with `pareto`: no other cell of the model is
    at least as good on every objective and better on one (all minimised). Each model's
    Pareto-optimal cells come first, ranked by val loss (`rank`). A cell that did not learn is
    left out: its low cost or time buys nothing."""
    varying = varying_settings(df)
    fixed = [c for c in df.columns if c.startswith(("train.", "data.")) and c not in varying]
    good = ok(df)
    if "learned" in good:
        good = good[good["learned"] == "yes"]
    good = good.drop(columns=fixed).dropna(subset=list(objectives))
    parts = [_front(g, list(objectives)) for _, g in good.groupby("model", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else good.assign(pareto=False, rank=np.nan)


def _front(g: pd.DataFrame, objectives: list[str]) -> pd.DataFrame:
    """One model's cells with `pareto` and `rank`, the Pareto-optimal first by val loss."""
    values = g[objectives].to_numpy(dtype=float)
    front = [not any(np.all(w <= v) and np.any(w < v) for j, w in enumerate(values) if j != i)
             for i, v in enumerate(values)]
    g = g.assign(pareto=front).sort_values(["pareto", "val_loss"], ascending=[False, True], kind="stable")
    return g.assign(rank=g["pareto"].cumsum().where(g["pareto"]))


def failures(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["outcome"] != "ok"]


def _curve(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str) and value:
        return json.loads(value)
    return value if isinstance(value, list) else []


def chance(row: Any) -> float | None:
    """The accuracy of guessing, where the task defines it: one over its labels (classification),
    one half for the built-in majority task."""
    task = row.get("data.task")
    if task == "classification":
        labels = row.get("data.labels")
        labels = json.loads(labels) if isinstance(labels, str) and labels.startswith("[") else labels
        return 1.0 / len(labels) if isinstance(labels, (list, tuple)) and labels else None
    return 0.5 if task == "synthetic" else None


def not_learned(row: Any) -> str | None:
    """Why a finished cell did not learn: its training loss did not fall clearly below its first,
    or its accuracy is no better than chance; None where it learned (or cannot be told)."""
    curve = [p["loss"] for p in _curve(row.get("loss_curve")) if p.get("loss") is not None]
    if len(curve) >= 2:
        tail = curve[-max(1, len(curve) // 10):]
        final = float(np.mean(tail))
        if not final <= curve[0] * (1 - LEARNED_DROP):
            return f"did not learn: training loss {final:.4g} against {curve[0]:.4g} at its first step"
    guess, acc = chance(row), row.get("accuracy")
    if guess is not None and acc is not None and not pd.isna(acc) and acc <= guess:
        return f"did not learn: accuracy {acc:.1%}, no better than chance ({guess:.0%})"
    return None
