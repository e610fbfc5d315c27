"""Key findings: short sentences written from the derived tables, each with its numbers.

A sentence is written only where the data carries it: two finished cells that differ in the
one setting compared (or a failure beside a success); nothing is said about what did not run.
"""

from __future__ import annotations

import pandas as pd

from steps.report import analysis

NAMES = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}


def where(r, *skip: str, detail: bool = False) -> str:
    """'llama-debug lora ddp x2 on local-cpu' minus the settings the sentence is about; with
    detail, the learning rate and batch too (to tell apart cells of one configuration)."""
    parts = [] if "model" in skip else [str(r["model"])]
    if "peft" not in skip and "peft" in r:
        parts.append(str(r["peft"]))
    if "strategy" not in skip:
        parts.append(str(r["strategy"]) + ("" if "world_size" in skip else f" x{int(r['world_size'])}"))
    if "micro_batch" not in skip and not detail and pd.notna(r.get("micro_batch")):
        parts.append(f"micro-batch {int(r['micro_batch'])}")
    if "precision" not in skip and isinstance(r.get("precision"), str):
        parts.append(r["precision"])
    parts += [analysis.setting_text(k, r[k]) for k in r.keys() if k.startswith(("train.", "data.")) and k not in skip]
    if "instance" not in skip:
        parts.append(f"on {r['instance']}")
    if detail:
        parts.append(f"(lr {r['lr']:g}, micro-batch {int(r['micro_batch'])}, global batch {int(r['global_batch'])})")
    return " ".join(parts)


def failures(df: pd.DataFrame) -> list[str]:
    bad = analysis.failures(df)
    if bad.empty:
        return []
    counts = ", ".join(f"{n} {o}" for o, n in bad["outcome"].value_counts().sort_index().items())
    return [f"{len(bad)} of {len(df)} cells did not finish ({counts}); they are listed with their reasons "
            f"under 'Cells that did not finish'."]


def scaling(table: pd.DataFrame) -> list[str]:
    out = []
    for _, g in analysis.by_config(table, "world_size"):
        top = g.sort_values("world_size").iloc[-1]
        out.append(f"{top['strategy']} on {top['world_size']} GPUs ({where(top, 'strategy')}) ran "
                   f"{top['tokens_per_s']:,.0f} tokens/s, {top['speedup']:.2f}x the throughput of {top['base']}: "
                   f"{top['efficiency']:.0%} scaling efficiency.")
    return out


def methods(table: pd.DataFrame) -> list[str]:
    out = []
    for _, g in analysis.by_config(table, "peft"):
        per = {r["peft"]: r for _, r in g.iterrows()}
        lora = per.get("lora")
        if lora is None or lora["outcome"] != "ok":
            continue
        at = where(lora, "peft")
        for peft in ("qlora", "dora", "full"):
            r = per.get(peft)
            if r is None:
                continue
            if r["outcome"] != "ok":
                out.append(f"{NAMES[peft]} {_failed(r['outcome'])} on {at}, where LoRA fit "
                           f"({lora['peak_mem_gb']:.2f} GB peak).")
                continue
            out.append(f"{NAMES[peft]} used {_versus(r, lora, 'LoRA')} on {at}.")
    return out


def precisions(table: pd.DataFrame) -> list[str]:
    out = []
    for _, g in analysis.by_config(table, "precision"):
        out += _against_first(g, lambda r: r["precision"], lambda r: where(r, "precision"))
    return out


def settings(table: pd.DataFrame) -> list[str]:
    """Along each swept train/data setting: memory, speed and loss against its first value."""
    out = []
    if table.empty:
        return out
    for (name, _), g in table.groupby(["setting", "group"], sort=False):
        g = g.drop(columns=[c for c in g if c.startswith(("train.", "data.")) and g[c].isna().all()])  # others' rows
        out += _against_first(g, lambda r, name=name: analysis.setting_text(name, r["value"]),
                              lambda r, name=name: where(r.drop(["setting", "value", "group", "others"]), name))
    return out


def _against_first(g: pd.DataFrame, label, at) -> list[str]:
    """Each later row of a group against the first (which must have finished): its failure, or
    its memory, speed and val loss. `label(row)` names the value compared, `at(row)` the rest."""
    ref = g.iloc[0]
    if ref["outcome"] != "ok":
        return []
    out = []
    for _, r in g.iloc[1:].iterrows():
        if r["outcome"] != "ok":
            out.append(f"{label(r)} {_failed(r['outcome'])} on {at(r)}, where {label(ref)} trained.")
        else:
            out.append(f"{label(r)} used {_versus(r, ref, label(ref))}, val loss {r['val_loss']:.4g} "
                       f"vs {ref['val_loss']:.4g}, on {at(r)}.")
    return out


def _versus(r, ref, name: str) -> str:
    """'40% less peak memory than LoRA (12.00 vs 20.00 GB) at 2.00x lower throughput (...)'."""
    mem, speed = r["peak_mem_gb"] / ref["peak_mem_gb"], r["tokens_per_s"] / ref["tokens_per_s"]
    mem_text = f"{1 - mem:.0%} less" if mem < 1 else f"{mem - 1:.0%} more"
    speed_text = f"{1 / speed:.2f}x lower" if speed < 1 else f"{speed:.2f}x higher"
    return (f"{mem_text} peak memory than {name} ({r['peak_mem_gb']:.2f} vs {ref['peak_mem_gb']:.2f} GB) at "
            f"{speed_text} throughput ({r['tokens_per_s']:,.0f} vs {ref['tokens_per_s']:,.0f} tokens/s)")


def _failed(outcome: str) -> str:
    return {"oom": "ran out of memory", "hang": "hung", "timeout": "timed out", "diverged": "diverged"}.get(
        outcome, f"ended {outcome}")


def instances(table: pd.DataFrame) -> list[str]:
    out = []
    for _, g in analysis.by_config(table, "instance"):
        good = g[g["outcome"] == "ok"].sort_values("train_s")
        if len(good) < 2:
            continue
        fast, slow = good.iloc[0], good.iloc[-1]
        cheaper = "and cost less" if fast["cost_usd"] < slow["cost_usd"] else "but cost more"
        out.append(f"On {where(fast, 'instance')}, {fast['instance']} trained {slow['train_s'] / fast['train_s']:.2f}x "
                   f"faster than {slow['instance']} ({fast['train_s']:.1f} s vs {slow['train_s']:.1f} s) {cheaper}: "
                   f"${fast['cost_usd']:.4g} vs ${slow['cost_usd']:.4g} per run, "
                   f"${fast['cost_per_mtok']:.4g} vs ${slow['cost_per_mtok']:.4g} per million tokens.")
    return out


def learning_rate(sweep: pd.DataFrame, fits: pd.DataFrame) -> list[str]:
    out = []
    if sweep.empty:
        return out
    for _, r in sweep[sweep["best"]].iterrows():
        edge = "; it is at the edge of the rates tried, so the optimum may lie beyond" if r["at_edge"] else ""
        out.append(f"Best learning rate for {where(r)} (global batch {r['global_batch']}): {r['lr']:g}, "
                   f"val loss {r['val_loss']:.4g}{edge}.")
    for _, f in fits.iterrows():
        caveat = " (some best rates are at the edge of the grid)" if f["any_at_edge"] else ""
        out.append(f"{NAMES.get(f['peft'], f['peft'])} on {f['model']}: from global batch {f['min_batch']} to "
                   f"{f['max_batch']} the best learning rate went as batch^{f['exponent']:.2f} "
                   f"(linear rule 1, square-root rule 0.5): closest to the {f['closest_rule']} rule{caveat}.")
    return out


def batch_size(fit: pd.DataFrame, equal: pd.DataFrame) -> list[str]:
    out = []
    for _, r in fit.iterrows():
        if r["largest_ok"] is None or pd.isna(r["largest_ok"]):
            continue
        beyond = (f"; micro-batch {int(r['first_failed'])} {_failed(r['failed_as'])}"
                  if pd.notna(r["first_failed"]) else " (the largest tried)")
        out.append(f"Largest micro-batch that fit for {where(r)}: {int(r['largest_ok'])} "
                   f"({r['peak_mem_gb_at_largest']:.2f} GB peak){beyond}.")
    for _, g in analysis.by_config(equal, "micro_batch", "grad_accum"):
        best = (g.dropna(subset=["loss_at_tokens"]).sort_values("loss_at_tokens")
                .groupby("global_batch", sort=True).head(1).sort_values("global_batch"))
        if len(best) < 2:
            continue
        each = "; ".join(f"global batch {r['global_batch']} (lr {r['lr']:g}) {r['loss_at_tokens']:.4g}"
                         for _, r in best.iterrows())
        out.append(f"After the same {best['tokens'].iloc[0]:,.0f} tokens on {where(best.iloc[0], 'micro_batch')}, "
                   f"the best training loss of each global batch: {each}.")
    return out


def goodput(table: pd.DataFrame) -> list[str]:
    out = []
    if table.empty:
        return out
    for model, g in table.groupby("model"):
        hit = g.dropna(subset=["time_to_target_s"]).sort_values("time_to_target_s")
        if len(hit) >= 2:
            a, b = hit.iloc[0], hit.iloc[-1]
            out.append(f"Fastest to loss {a['target_loss']:.4g} on {model}: {where(a, 'model', detail=True)} in "
                       f"{a['time_to_target_s']:.1f} s ({a['tokens_to_target']:,.0f} tokens), "
                       f"{b['time_to_target_s'] / a['time_to_target_s']:.2f}x sooner than "
                       f"{where(b, 'model', detail=True)} ({b['time_to_target_s']:.1f} s).")
        missed = int((g["curve_points"] > 0).sum()) - len(hit)
        if missed > 0 and (g["target_from"] == "matrix").all():  # a median target: half miss it by design
            out.append(f"{missed} of {int((g['curve_points'] > 0).sum())} finished cells with a loss curve on {model} "
                       f"never reached loss {g['target_loss'].iloc[0]:.4g} (train.target_loss).")
        for batch, same in g.dropna(subset=["updates_per_s"]).groupby("global_batch"):
            if len(same) < 2:
                continue  # updates of different sizes are not comparable
            same = same.sort_values("updates_per_s", kind="stable")
            hi, lo = same.iloc[-1], same.iloc[0]
            if hi["updates_per_s"] < 1.01 * lo["updates_per_s"]:
                continue  # no difference worth a sentence
            out.append(f"Highest goodput on {model} at global batch {int(batch)}: {where(hi, 'model', detail=True)} at "
                       f"{hi['updates_per_s']:.2f} updates/s ({hi['samples_per_s']:,.1f} samples/s), "
                       f"{hi['updates_per_s'] / lo['updates_per_s']:.2f}x {where(lo, 'model', detail=True)}.")
    return out


def pareto(front: pd.DataFrame) -> list[str]:
    if len(front) < 2:
        return []
    best = front[front["pareto"]].sort_values("cost_usd")
    shown = best.head(5)
    more = f"; and {len(best) - len(shown)} more (table below)" if len(best) > len(shown) else ""
    names = "; ".join(f"{where(r, detail=True)}: ${r['cost_usd']:.4g}, {r['wall_s']:.1f} s, "
                      f"val loss {r['val_loss']:.4g}" for _, r in shown.iterrows())
    return [f"{len(best)} of {len(front)} finished cells are Pareto-optimal in (cost, time, val loss): {names}{more}."]


def all_findings(sections: dict[str, pd.DataFrame], df: pd.DataFrame) -> list[str]:
    return (failures(df) + scaling(sections["scaling"]) + methods(sections["methods"])
            + precisions(sections["precisions"]) + settings(sections["settings"])
            + instances(sections["instances"]) + learning_rate(sections["lr_sweep"], sections["lr_scaling"])
            + batch_size(sections["batch_fit"], sections["equal_tokens"]) + goodput(sections["goodput"])
            + pareto(sections["pareto"]))
