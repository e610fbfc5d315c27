"""Key findings: the differences the data carries, each judged against the noise this run measures.

A finding compares two configurations that differ in the one setting compared, each at its best
learning rate (`analysis.best_rows`: one cell, or the mean of its repeats), one quantity at a
time: memory, throughput, time, cost or loss. It is a `Finding`: the sentence, the quantity, the
difference relative to the reference side, the noise of both sides on the same scale, and whether
the difference is outside that noise (`Noise`). A failure beside a success, and the run's
failures, are findings of their own. The report lists the findings outside the noise, largest
first, at most `TOP`, then the rest, marked as such (`section`). Nothing is said about what did
not run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from steps.report import analysis, decision

TOP = 10  # findings listed as key findings
SHORT = 5  # of the others, listed by name below them (beyond the first ten; within the noise); the rest counted
NAMES = {"full": "Full fine-tuning", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA"}
LOSSES = ("val_loss", "loss_at_tokens")  # judged against the loss spread, the rest against speed spreads
SPEED_OF = {"updates_per_s": "step_s", "time_to_target_s": "tokens_per_s"}  # whose same-shape spread is theirs
# Settings a sentence may name to say where it holds, in this order (and any swept train/data setting).
CONTEXT = ["model", "peft", "strategy", "world_size", "precision", "micro_batch", "grad_accum", "seq_len", "instance"]
FAILED = {"oom": "ran out of memory", "hang": "hung", "timeout": "timed out", "diverged": "diverged",
          "stopped": "was stopped on its cluster"}
COUNTED = {"micro_batch": "micro-batch", "grad_accum": "accum", "seq_len": "seq"}  # named before their number


@dataclass(frozen=True)
class Finding:
    """One sentence and what it rests on. `effect`: the difference over the reference side's
    value (inf for a failure beside a success); `noise`: the two sides' noise on the same
    scale; `outside`: the difference exceeds it, so the sentence is a finding, not noise."""

    text: str
    quantity: str
    effect: float
    noise: float
    outside: bool


class Noise:
    """How far a quantity of one side can move with nothing that matters changed: speed, time,
    cost and memory by the spread of same-shape cells (`decision.speed_noise`, at least 2%); a
    loss by the spread of equivalent cells at the side's precision (`decision.loss_noise`), at
    least 0.1% of it; a mean of repeats by at least their spread too."""

    def __init__(self, df: pd.DataFrame):
        self.df = df
        self.by_id = df.drop_duplicates("cell_id").set_index("cell_id", drop=False) if len(df) else df
        self.loss = decision.loss_noise(df)[0] if len(df) else {}
        self._speed: dict[str, float] = {}

    def relative(self, col: str) -> float:
        """The relative same-shape spread of `col` (or of the column that sets it)."""
        col = SPEED_OF.get(col, col)
        if col not in self._speed:
            known = col in self.df and len(self.df)
            self._speed[col] = decision.speed_noise(self.df, col)[0] if known else decision.MIN_SPEED_EFFECT
        return self._speed[col]

    def half(self, side: Any, col: str) -> float:
        """The half-width of one side's value of `col`."""
        value = abs(float(side[col]))
        spread = self._repeats(side, col)
        if col in LOSSES:
            return max(self.loss.get(side.get("precision"), 0.0), spread, decision.MIN_LOSS_EFFECT * value)
        return max(self.relative(col) * value, spread)

    def _repeats(self, side: Any, col: str) -> float:
        """The spread of `col` over the repeats a side averages (0 for one cell)."""
        members = [m for m in (side.get("members") or ()) if m in self.by_id.index]
        if len(members) < 2 or col not in self.by_id:
            return 0.0
        values = self.by_id.loc[members, col].dropna()
        return float(values.max() - values.min()) if len(values) >= 2 else 0.0

    def same_shape(self, a: str, b: str) -> bool:
        """Whether two cells differ only in learning rate or seeds: their speed differs by noise."""
        from steps.estimate import calibrate

        rows = [self.by_id.loc[c] for c in (a, b) if c in self.by_id.index]
        return len(rows) == 2 and len({calibrate.shape(calibrate.cell_of_row(r)) for r in rows}) == 1


def judged(text: str, quantity: str, side: Any, ref: Any, col: str, noise: Noise) -> Finding:
    """`side` against `ref` in `col`: a finding where the difference exceeds both sides' noise."""
    a, b = float(side[col]), float(ref[col])
    width = noise.half(side, col) + noise.half(ref, col)
    scale = abs(b) or abs(a) or 1.0
    return Finding(text, quantity, abs(a - b) / scale, width / scale, abs(a - b) > width)


def failure(text: str) -> Finding:
    """A failure, or a failure beside a success: no noise makes it go away."""
    return Finding(text, "outcome", math.inf, 0.0, True)


def differing(table: pd.DataFrame, *skip: str) -> list[str]:
    """The settings (`CONTEXT`, swept train/data settings) whose value differs between the rows
    of `table`, less `skip`: what a sentence must name to say which rows it is about."""
    keys = CONTEXT + analysis.varying_settings(table)
    return [k for k in keys if k not in skip and k in table and table[k].astype(str).nunique() > 1]


def where(r: Any, keys: list[str]) -> str:
    """'llama-30m ddp x2 seq 256 on local-cpu': the row's value of each of `keys`."""
    parts = []
    for k in keys:
        v = r.get(k)
        if k == "world_size":
            parts.append(f"x{int(v)}" if "strategy" in keys else f"{int(v)} GPU{'s' if v != 1 else ''}")
        elif k in COUNTED:
            parts.append(f"{COUNTED[k]} {int(v)}")
        elif k == "lr":
            parts.append(f"lr {v:g}")
        elif k == "instance":
            parts.append(f"on {v}")
        elif k.startswith(("train.", "data.")):
            parts.append(analysis.setting_text(k, v))
        else:
            parts.append(str(v))
    return " ".join(parts)


def _at(r: Any, keys: list[str]) -> str:
    """' on llama-30m ddp x2': where the sentence holds, or nothing when nothing tells it apart."""
    text = where(r, keys)
    return "" if not text else (f" {text}" if text.startswith("on ") else f" on {text}")


def _failed(r: Any) -> str:
    """'ran out of memory under a 1.5 GB cap': how a row failed (with the cap that caused it)."""
    text = FAILED.get(r["outcome"], f"ended {r['outcome']}")
    cap = r.get("train.memory_cap_gb") if r["outcome"] == "oom" else None
    return text + (f" under a {float(cap):g} GB cap" if cap is not None and pd.notna(cap) else "")


def _gb(v: float) -> str:
    return f"{v:.2f}" if v >= 0.995 else f"{v:.3g}"


def _pct(a: float, b: float, less: str = "less", more: str = "more") -> str:
    """'12% less', '0.2% higher': a against b, a tenth of a percent where under 10%."""
    x = abs(a / b - 1)
    return (f"{x:.0%}" if x >= 0.1 else f"{x:.1%}") + f" {less if a < b else more}"


def _how(a: Any, b: Any) -> str:
    """What the sentence must add about how its sides were measured: their best learning rates
    where they differ, the number of repeats averaged, a side that did not learn."""
    notes = []
    if a.get("lr") != b.get("lr"):
        notes.append(f" at their best learning rates ({a['lr']:g} vs {b['lr']:g})")
    n = max(int(a.get("repeats") or 1), int(b.get("repeats") or 1))
    if n > 1:
        notes.append(f" (means of up to {n} repeats)")
    return "".join(notes)


def _unlearned(a: Any, b: Any, name_a: str, name_b: str) -> str:
    """'; LoRA did not learn (accuracy 0.0%, ...)': the sides whose loss says little."""
    said = {name.replace(NAMES["full"], "full fine-tuning"): str(r["learned"])[4:]
            for r, name in ((a, name_a), (b, name_b))
            if isinstance(r.get("learned"), str) and r["learned"].startswith("no")}
    if len(set(said.values())) == 1:
        return f"; {' and '.join(said)} did not learn: {next(iter(said.values()))}"
    return "".join(f"; {name} did not learn: {why}" for name, why in said.items())


def versus(a: Any, b: Any, name_a: str, name_b: str, at: str, noise: Noise) -> list[Finding]:
    """`a` against the reference `b`, both finished: memory, throughput and val loss, each a
    finding of its own (memory: training memory where both have a runtime baseline, else peak)."""
    out, how = [], _how(a, b)
    mem = analysis.memory_column(a, b)
    if pd.notna(a[mem]) and pd.notna(b[mem]) and b[mem] > 0:
        label = analysis.MEMORY_LABEL[mem]
        out.append(judged(f"{name_a} used {_pct(a[mem], b[mem])} {label} than {name_b} ({_gb(a[mem])} vs "
                          f"{_gb(b[mem])} GB){at}{how}.", label, a, b, mem, noise))
    if pd.notna(a["tokens_per_s"]) and pd.notna(b["tokens_per_s"]) and b["tokens_per_s"] > 0:
        out.append(judged(f"{name_a} ran {a['tokens_per_s'] / b['tokens_per_s']:.2f}x the throughput of {name_b} "
                          f"({a['tokens_per_s']:,.0f} vs {b['tokens_per_s']:,.0f} tokens/s){at}{how}.",
                          "throughput", a, b, "tokens_per_s", noise))
    if pd.notna(a["val_loss"]) and pd.notna(b["val_loss"]) and b["val_loss"] > 0:
        out.append(judged(f"{name_a} ended at val loss {a['val_loss']:.4g} against {b['val_loss']:.4g} for {name_b} "
                          f"({_pct(a['val_loss'], b['val_loss'], 'lower', 'higher')}){at}{how}"
                          f"{_unlearned(a, b, name_a, name_b)}.", "val loss", a, b, "val_loss", noise))
    return out


def failures(df: pd.DataFrame) -> list[Finding]:
    """The cells that did not finish, as one finding; the finished ones that did not learn, as another."""
    out = []
    bad = analysis.failures(df)
    if len(bad):
        counts = ", ".join(f"{n} {o}" for o, n in bad["outcome"].value_counts().sort_index().items())
        out.append(failure(f"{len(bad)} of {len(df)} cells did not finish ({counts}); they are listed with their "
                           f"reasons under 'Cells that did not finish'."))
    done = analysis.ok(df)
    unlearned = done[done["learned"].astype(str).str.startswith("no")] if "learned" in done else done.iloc[:0]
    if len(unlearned):
        out.append(failure(f"{len(unlearned)} of {len(done)} finished cells did not learn (the learned column under "
                           f"Results says why): they are left out of the Pareto set and the time to target."))
    return out


def scaling(table: pd.DataFrame, noise: Noise) -> list[Finding]:
    """Per configuration, its largest GPU count against its baseline: throughput."""
    out: list[Finding] = []
    if table.empty:
        return out
    keys = differing(table, "strategy", "world_size")
    for _, g in analysis.by_config(table, "world_size"):
        top = g.sort_values("world_size").iloc[-1]
        base = {"tokens_per_s": top["base_tokens_per_s"], "members": top["base_members"],
                "precision": top["precision"]}
        named = where(top, keys)
        out.append(judged(f"{top['strategy']} on {top['world_size']} GPUs{f' ({named})' if named else ''} ran "
                          f"{top['tokens_per_s']:,.0f} tokens/s, {top['speedup']:.2f}x the throughput of "
                          f"{top['base']}: {top['efficiency']:.0%} scaling efficiency.",
                          "throughput", top, base, "tokens_per_s", noise))
    return out


def methods(table: pd.DataFrame, noise: Noise) -> list[Finding]:
    """Each method against LoRA on the same configuration."""
    out: list[Finding] = []
    if table.empty:
        return out
    keys = differing(table, "peft")
    for _, g in analysis.by_config(table, "peft"):
        per = {r["peft"]: r for _, r in g.iterrows()}
        lora = per.get("lora")
        if lora is None or lora["outcome"] != "ok":
            continue
        at = _at(lora, keys)
        for peft in ("qlora", "dora", "full"):
            r = per.get(peft)
            if r is None:
                continue
            if r["outcome"] != "ok":
                out.append(failure(f"{NAMES[peft]} {_failed(r)}{at}, where LoRA trained."))
                continue
            out += versus(r, lora, NAMES[peft], "LoRA", at, noise)
    return out


def precisions(table: pd.DataFrame, noise: Noise) -> list[Finding]:
    if table.empty:
        return []
    keys = differing(table, "precision")
    out: list[Finding] = []
    for _, g in analysis.by_config(table, "precision"):
        out += _against_first(g, lambda r: r["precision"], keys, noise)
    return out


def settings(table: pd.DataFrame, noise: Noise) -> list[Finding]:
    """Along each swept train/data setting: memory, speed and loss against its first value."""
    out: list[Finding] = []
    if table.empty:
        return out
    for name, rows in table.groupby("setting", sort=False):
        keys = differing(rows, name)
        for _, g in rows.groupby("group", sort=False):
            out += _against_first(g, lambda r, name=name: analysis.setting_text(name, r["value"]), keys, noise)
    return out


def _against_first(g: pd.DataFrame, label, keys: list[str], noise: Noise) -> list[Finding]:
    """Each later row of a group against the first (which must have finished): its failure, or
    its memory, speed and val loss. `label(row)` names the value compared."""
    ref = g.iloc[0]
    if ref["outcome"] != "ok":
        return []
    at, out = _at(ref, keys), []
    for _, r in g.iloc[1:].iterrows():
        if r["outcome"] != "ok":
            out.append(failure(f"{label(r)} {_failed(r)}{at}, where {label(ref)} trained."))
        else:
            out += versus(r, ref, label(r), label(ref), at, noise)
    return out


def instances(table: pd.DataFrame, noise: Noise) -> list[Finding]:
    """Per configuration, the fastest instance type against the slowest: time, and cost."""
    out: list[Finding] = []
    if table.empty:
        return out
    keys = differing(table, "instance")
    for _, g in analysis.by_config(table, "instance"):
        good = g[g["outcome"] == "ok"].sort_values("train_s")
        if len(good) < 2:
            continue
        fast, slow = good.iloc[0], good.iloc[-1]
        at = _at(fast, keys)
        out.append(judged(f"{fast['instance']} trained {slow['train_s'] / fast['train_s']:.2f}x faster than "
                          f"{slow['instance']} ({fast['train_s']:.1f} s vs {slow['train_s']:.1f} s){at}.",
                          "training time", slow, fast, "train_s", noise))
        cheap, dear = sorted((fast, slow), key=lambda r: r["cost_usd"])
        out.append(judged(f"{dear['instance']} cost {dear['cost_usd'] / cheap['cost_usd']:.2f}x as much as "
                          f"{cheap['instance']} per run (${dear['cost_usd']:.4g} vs ${cheap['cost_usd']:.4g}; "
                          f"${dear['cost_per_mtok']:.4g} vs ${cheap['cost_per_mtok']:.4g} per million tokens){at}.",
                          "cost", dear, cheap, "cost_usd", noise))
    return out


def learning_rate(sweep: pd.DataFrame, fits: pd.DataFrame, noise: Noise) -> list[Finding]:
    """Each configuration's best rate against its next best; the fit of best rate against batch,
    which counts only where every best rate it rests on does."""
    out: list[Finding] = []
    if sweep.empty:
        return out
    keys, beaten = differing(sweep, "lr"), []
    for _, g in analysis.by_config(sweep):
        found = _best_rate(g, keys, noise)
        out += [found] if found else []
        beaten.append((g["model"].iloc[0], g["peft"].iloc[0], bool(found and found.outside)))
    for _, f in fits.iterrows():
        firm = [v for m, p, v in beaten if (m, p) == (f["model"], f["peft"])]
        caveat = " (some best rates are at the edge of the grid)" if f["any_at_edge"] else ""
        grew = (f["max_batch"] / f["min_batch"]) ** f["exponent"]
        out.append(Finding(f"{NAMES.get(f['peft'], f['peft'])} on {f['model']}: from global batch {f['min_batch']} "
                           f"to {f['max_batch']} the best learning rate went as batch^{f['exponent']:.2f} (linear "
                           f"rule 1, square-root rule 0.5): closest to the {f['closest_rule']} rule{caveat}.",
                           "best learning rate", abs(grew - 1), math.nan,
                           len(firm) >= 2 and all(firm) and not f["any_at_edge"]))
    return out


def _best_rate(g: pd.DataFrame, keys: list[str], noise: Noise) -> Finding | None:
    """The best rate's val loss against the next best rate's among the cells it was chosen from."""
    best = g[g["best"]]
    if best.empty:
        return None
    b = best.iloc[0]
    rivals = g[~g["best"] & g["val_loss"].notna()]
    if b["learned"] == "yes":
        rivals = rivals[rivals["learned"] == "yes"]
    if rivals.empty:
        return None
    second = rivals.sort_values("val_loss").iloc[0]
    edge = "; it is at the edge of the rates tried, so the optimum may lie beyond" if b["at_edge"] else ""
    named = where(b, keys)
    return judged(f"Best learning rate{f' for {named}' if named else ''}: {b['lr']:g}, val loss {b['val_loss']:.4g} "
                  f"against {second['val_loss']:.4g} at {second['lr']:g}{edge}.", "val loss", second, b, "val_loss",
                  noise)


def batch_size(fit: pd.DataFrame, equal: pd.DataFrame, noise: Noise) -> list[Finding]:
    """The micro-batch that first failed above one that fit; the training loss of each global
    batch after the same tokens, best against worst."""
    out: list[Finding] = []
    keys = differing(fit, "micro_batch") if len(fit) else []
    for _, r in fit.iterrows():
        if r["largest_ok"] is None or pd.isna(r["largest_ok"]) or pd.isna(r["first_failed"]):
            continue
        failed = _failed({"outcome": r["failed_as"], "train.memory_cap_gb": r.get("cap_gb")})
        out.append(failure(f"Largest micro-batch that fit{_at(r, keys)}: {int(r['largest_ok'])} "
                           f"({_gb(r['peak_mem_gb_at_largest'])} GB peak); micro-batch {int(r['first_failed'])} "
                           f"{failed}."))
    keys = differing(equal, "micro_batch", "grad_accum") if len(equal) else []
    for _, g in analysis.by_config(equal, "micro_batch", "grad_accum"):
        best = (g.dropna(subset=["loss_at_tokens"]).sort_values("loss_at_tokens")
                .groupby("global_batch", sort=True).head(1).sort_values("global_batch"))
        if len(best) < 2:
            continue
        each = "; ".join(f"global batch {r['global_batch']} (lr {r['lr']:g}) {r['loss_at_tokens']:.4g}"
                         for _, r in best.iterrows())
        low, high = best.sort_values("loss_at_tokens").iloc[0], best.sort_values("loss_at_tokens").iloc[-1]
        out.append(judged(f"After the same {best['tokens'].iloc[0]:,.0f} tokens{_at(best.iloc[0], keys)}, the best "
                          f"training loss of each global batch: {each}.", "training loss", high, low,
                          "loss_at_tokens", noise))
    return out


def goodput(table: pd.DataFrame, noise: Noise, picked: set[str]) -> list[Finding]:
    """Per model: the cell that learned fastest to the target against the fastest of another
    shape; cells that missed a target the matrix set; per global batch, the highest goodput
    against the lowest among the configurations (`picked`: each at its best learning rate)."""
    out: list[Finding] = []
    if table.empty:
        return out
    for model, g in table.groupby("model"):
        learnt = g[g["learned"] == "yes"] if "learned" in g else g
        out += _fastest(learnt, model, noise)
        hit = learnt.dropna(subset=["time_to_target_s"])
        missed = int((g["curve_points"] > 0).sum()) - len(hit)
        if missed > 0 and (g["target_from"] == "matrix").all():  # a median target: half miss it by design
            out.append(failure(f"{missed} of {int((g['curve_points'] > 0).sum())} finished cells with a loss curve on "
                               f"{model} did not reach loss {g['target_loss'].iloc[0]:.4g} (train.target_loss) "
                               f"or did not learn."))
        out += _updates(g[g["cell_id"].isin(picked)], model, noise)
    return out


def _fastest(g: pd.DataFrame, model: str, noise: Noise) -> list[Finding]:
    hit = g.dropna(subset=["time_to_target_s"]).sort_values("time_to_target_s")
    if len(hit) < 2:
        return []
    a = hit.iloc[0]
    rivals = [r for _, r in hit.iloc[1:].iterrows() if not noise.same_shape(a["cell_id"], r["cell_id"])]
    if not rivals:
        return []
    b = rivals[0]
    keys = differing(pd.DataFrame([a, b]), "model", "lr") + ["lr"]
    return [judged(f"Fastest to loss {a['target_loss']:.4g} on {model}: {where(a, keys)} in "
                   f"{a['time_to_target_s']:.1f} s ({a['tokens_to_target']:,.0f} tokens), "
                   f"{b['time_to_target_s'] / a['time_to_target_s']:.2f}x sooner than the fastest of another shape, "
                   f"{where(b, keys)} ({b['time_to_target_s']:.1f} s).", "time to target", b, a,
                   "time_to_target_s", noise)]


def _updates(g: pd.DataFrame, model: str, noise: Noise) -> list[Finding]:
    """Updates of one size compare: per global batch, the highest goodput against the lowest,
    never between cells of one shape (their difference is noise)."""
    out = []
    for batch, same in g.dropna(subset=["updates_per_s"]).groupby("global_batch"):
        same = same.sort_values("updates_per_s", kind="stable")
        hi, lo = same.iloc[-1], same.iloc[0]
        if len(same) < 2 or noise.same_shape(hi["cell_id"], lo["cell_id"]):
            continue
        keys = differing(pd.DataFrame([hi, lo]), "model", "global_batch")  # what tells the two apart
        out.append(judged(f"Highest goodput on {model} at global batch {int(batch)}: {where(hi, keys)} at "
                          f"{hi['updates_per_s']:.2f} updates/s ({hi['samples_per_s']:,.1f} samples/s), "
                          f"{hi['updates_per_s'] / lo['updates_per_s']:.2f}x the lowest, {where(lo, keys)}.",
                          "goodput", hi, lo, "updates_per_s", noise))
    return out


def rank(found: list[Finding]) -> list[Finding]:
    """Outside the noise first, largest effect first (failures lead); then the rest, likewise."""
    return sorted(found, key=lambda f: (not f.outside, -f.effect if f.effect == f.effect else 0.0))


def all_findings(sections: dict[str, pd.DataFrame], df: pd.DataFrame) -> list[Finding]:
    """Every finding of the run, ranked (`rank`)."""
    noise = Noise(df)
    picked = set(analysis.best_rows(analysis.ok(df))["cell_id"]) if len(analysis.ok(df)) else set()
    return rank(failures(df) + scaling(sections["scaling"], noise) + methods(sections["methods"], noise)
                + precisions(sections["precisions"], noise) + settings(sections["settings"], noise)
                + instances(sections["instances"], noise)
                + learning_rate(sections["lr_sweep"], sections["lr_scaling"], noise)
                + batch_size(sections["batch_fit"], sections["equal_tokens"], noise)
                + goodput(sections["goodput"], noise, picked))


INTRO = ("Differences larger than the noise of both sides, largest first: each configuration at its best "
         "learning rate (the lowest val loss among its cells that learned), its memory, speed and loss from "
         "the same cells. Noise: for speed, time, cost and memory the largest spread of cells of one shape "
         f"(at least {decision.MIN_SPEED_EFFECT:.0%}); for a loss the spread of equivalent cells at its "
         f"precision (at least {decision.MIN_LOSS_EFFECT:.1%}); with repeats, at least their spread.")


def _noted(f: Finding) -> str:
    """A sentence within the noise, with its difference and the noise it is judged against."""
    if f.noise != f.noise:
        return f"{f.text} (not every best rate it rests on stands out of the noise)"
    return f"{f.text} ({f.effect:.1%} apart, within a noise of {f.noise:.1%})"


def section(found: list[Finding], lead: list[str] | tuple[str, ...] = ()) -> str:
    """The report's Key findings: `lead` (said first), up to `TOP` findings outside the noise,
    then those beyond the first `TOP`, then those within the noise, under their own headings."""
    key = [f for f in found if f.outside]
    within = [f for f in found if not f.outside]
    if not key and not within and not lead:
        return "## Key findings\n\n_No comparison in this run has enough finished cells._"
    lines = [f"- {t}" for t in lead] + [f"- {f.text}" for f in key[:TOP]]
    text = "## Key findings\n\n" + INTRO + "\n\n" + ("\n".join(lines) if lines else "_None outside the noise._")
    if key[TOP:]:
        text += (f"\n\nBeyond the first {TOP}, outside the noise too, largest first:\n\n"
                 + "\n".join(f"- {f.text}" for f in key[TOP:TOP + SHORT]) + _rest(key[TOP + SHORT:], "outside"))
    if within:
        text += ("\n\nWithin the noise, so not findings (the data cannot tell these apart), largest first:\n\n"
                 + "\n".join(f"- {_noted(f)}" for f in within[:SHORT]) + _rest(within[SHORT:], "within"))
    return text


def _rest(more: list[Finding], side: str) -> str:
    """'- and 12 more within the noise: 9 throughput, 3 goodput (the tables below hold them).'"""
    if not more:
        return ""
    counts: dict[str, int] = {}
    for f in more:
        counts[f.quantity] = counts.get(f.quantity, 0) + 1
    return (f"\n- and {len(more)} more {side} the noise: "
            + ", ".join(f"{n} {q}" for q, n in counts.items()) + " (the tables below hold them).")
