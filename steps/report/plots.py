"""The report's figures (matplotlib, PNG): where a reader would rather look than read.

Each function draws one figure from the table (or a derived table) and returns its path, or
None when the data has nothing to show (a run with one strategy has no scaling plot).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no screen: files only
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from steps.report import analysis  # noqa: E402

MAX_CURVES = 16
METHOD_ORDER = ["full", "lora", "dora", "qlora"]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


SHORT = {"world_size": "x{}", "lr": "lr {:g}", "micro_batch": "mb {}", "grad_accum": "accum {}", "seq_len": "seq {}"}


def _label(r, keys: list[str]) -> str:
    """'ddp x2 mb 8 accum 1': each setting that varies, numbers with their name."""
    return " ".join(SHORT.get(k, "{}").format(int(r[k]) if k != "lr" else r[k]) if k in SHORT else str(r[k])
                    for k in keys)


def _varying(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """The settings that differ between rows: what a legend must say."""
    return [k for k in keys if k in df and df[k].astype(str).nunique() > 1] or keys[:1]


def throughput_vs_gpus(df: pd.DataFrame, path: Path) -> Path | None:
    """tokens/s against GPU count, one line per strategy (and whatever else varies), each
    configuration at its best learning rate (`analysis.best_rows`), with the ideal linear
    scaling from each line's smallest count dashed."""
    good = analysis.ok(df)
    if good.empty or good["world_size"].nunique() < 2:
        return None
    good = analysis.best_rows(good)
    keys = _varying(good, ["strategy", "peft", "model", "instance", "precision"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, g in good.groupby(keys):
        pts = g.groupby("world_size")["tokens_per_s"].median().sort_index()
        label = " ".join(map(str, name if isinstance(name, tuple) else (name,)))
        line, = ax.plot(pts.index, pts.values, marker="o", label=label)
        if len(pts) > 1:
            ax.plot(pts.index, pts.iloc[0] * pts.index / pts.index[0], ls="--", lw=0.8,
                    color=line.get_color(), alpha=0.6)
    ax.set_xlabel("GPUs (ranks)")
    ax.set_ylabel("tokens/s (all ranks)")
    ax.set_xticks(sorted(good["world_size"].unique()))
    ax.set_title("Throughput vs GPU count (dashed: linear scaling)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def memory_by_method(df: pd.DataFrame, path: Path) -> Path | None:
    """Memory of the largest rank per method, grouped by strategy and GPU count: training memory
    (the peak less the runtime's baseline) where every finished cell has a baseline, else the
    peak; cells that ran out of memory are drawn as a hatched marker labelled OOM."""
    ran = df[df["outcome"].isin(["ok", "oom"])]
    if ran.empty or ran["peak_mem_gb"].notna().sum() == 0:
        return None
    done = analysis.ok(ran)
    col = analysis.memory_column(*(r for _, r in done.iterrows())) if len(done) else "peak_mem_gb"
    ran = ran.assign(group=ran["strategy"] + " x" + ran["world_size"].astype(int).astype(str))
    extra = [k for k in ("model", "instance", "precision") if ran[k].nunique() > 1]
    if extra:
        ran = ran.assign(group=ran["group"] + " " + ran[extra].astype(str).agg(" ".join, axis=1))
    groups = list(dict.fromkeys(ran.sort_values(["strategy", "world_size"])["group"]))
    methods = [m for m in METHOD_ORDER if m in set(ran["peft"])]
    width = 0.8 / max(len(methods), 1)
    top = ran[col].max()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) + 2), 4.2))
    for i, method in enumerate(methods):
        for j, group in enumerate(groups):
            cells = ran[(ran["peft"] == method) & (ran["group"] == group)]
            if cells.empty:
                continue
            x = j + (i - (len(methods) - 1) / 2) * width
            good = cells[cells["outcome"] == "ok"][col]
            if len(good):
                ax.bar(x, good.median(), width, color=f"C{i}", label=method)
            else:
                ax.bar(x, top * 1.05, width, color="none", edgecolor=f"C{i}", hatch="//", label=f"{method} (OOM)")
                ax.text(x, top * 1.07, "OOM", ha="center", fontsize=8, color="crimson")
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"{analysis.MEMORY_LABEL[col]}, largest rank (GB)")
    ax.set_title(f"{analysis.MEMORY_LABEL[col].capitalize()} per method and strategy")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def loss_curves(df: pd.DataFrame, path: Path) -> Path | None:
    """Training loss (smoothed) against tokens seen, per finished cell, the lowest final
    losses first when there are more cells than fit one legend."""
    good = analysis.ok(df)
    rows = [(r, analysis.curve(r)) for _, r in good.sort_values("val_loss").iterrows()]
    rows = [(r, c) for r, c in rows if c][:MAX_CURVES]
    if not rows:
        return None
    keys = _varying(good, ["peft", "strategy", "world_size", "instance", "lr", "micro_batch", "grad_accum",
                           "precision", "seq_len", "model"])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for r, c in rows:
        tokens, total = [], 0.0
        for p in c:
            total += p["tokens"]
            tokens.append(total)
        ax.plot(tokens, analysis.smooth([p["loss"] for p in c]), lw=1.2, label=_label(r, keys))
    ax.set_xlabel("tokens trained")
    ax.set_ylabel(f"training loss (mean of last {analysis.SMOOTH_WINDOW} steps)")
    ax.set_title("Loss curves" + (f" (best {MAX_CURVES} of {len(good)})" if len(good) > MAX_CURVES else ""))
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def lr_sweep(sweep: pd.DataFrame, path: Path) -> Path | None:
    """Validation loss against learning rate (log scale), one line per configuration; the best
    rate of each line is ringed."""
    if sweep.empty:
        return None
    keys = _varying(sweep, ["world_size", "peft", "strategy", "instance", "micro_batch", "model"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, g in sweep.groupby(keys):
        g = g.sort_values("lr")
        label = " ".join(f"{k}={v}" for k, v in zip(keys, name if isinstance(name, tuple) else (name,)))
        line, = ax.plot(g["lr"], g["val_loss"], marker="o", label=f"{label} (batch {g['global_batch'].iloc[0]})")
        best = g[g["best"]]
        ax.scatter(best["lr"], best["val_loss"], s=140, facecolors="none", edgecolors=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation loss")
    ax.set_title("Learning-rate sweep (ringed: best rate)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def cost_vs_time(front: pd.DataFrame, path: Path) -> Path | None:
    """Cost against wall time per finished cell; the Pareto set of (cost, time, val loss) is
    drawn in red and labelled with its validation loss."""
    if front.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    rest, best = front[~front["pareto"]], front[front["pareto"]]
    ax.scatter(rest["wall_s"], rest["cost_usd"], color="grey", alpha=0.6, label="dominated")
    ax.scatter(best["wall_s"], best["cost_usd"], color="crimson", label="Pareto set (cost, time, val loss)")
    for _, r in best.iterrows():
        ax.annotate(f"{r['peft']} {r['strategy']} x{int(r['world_size'])}: {r['val_loss']:.3g}",
                    (r["wall_s"], r["cost_usd"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("cost (USD)")
    ax.set_title("Cost vs time (labels: validation loss)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
