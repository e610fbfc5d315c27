"""A Metaflow card per cell: what it was, how it ended, its loss curve and its numbers."""

from __future__ import annotations

import os
from typing import Any

from steps.report.render import fmt

CARD_METRICS = (
    ("outcome", "outcome"), ("world_size", "ranks"),
    ("global_batch", "global batch"), ("tokens_per_s", "tokens/s"),
    ("tokens_per_s_per_device", "tokens/s per device"), ("mfu", "MFU"),
    ("peak_mem_gb", "peak memory GB (largest rank)"), ("val_loss", "val loss"),
    ("accuracy", "accuracy"), ("final_train_loss", "final train loss"), ("train_s", "train s"),
    ("wall_s", "wall s"), ("overhead_s", "start-up and teardown s"), ("cost_usd", "cost $"),
    ("trainable_params", "trainable params"), ("total_params", "total params"),
)


def loss_chart_spec(metrics: dict[str, Any], title: str) -> dict[str, Any]:
    """Vega-Lite: train loss per step, validation loss where it was measured. The card draws
    it in the browser (no plotting library in the task)."""
    points = [{"step": p["step"], "loss": p["loss"], "split": "train"} for p in metrics.get("loss_curve") or []]
    points += [{"step": p["step"], "loss": p["val_loss"], "split": "validation"}
               for p in metrics.get("val_curve") or [] if p.get("val_loss") is not None]
    return {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "title": title, "width": 560, "height": 260, "data": {"values": points},
        "mark": {"type": "line", "point": {"filled": True, "size": 12}},
        "encoding": {
            "x": {"field": "step", "type": "quantitative"},
            "y": {"field": "loss", "type": "quantitative", "scale": {"zero": False}},
            "color": {"field": "split", "type": "nominal"},
        },
    }


def economy_line(metrics: dict[str, Any]) -> str:
    """What the cell was under `economy:` (nothing without it), and where it diverged."""
    role, steps = metrics.get("economy_role"), len(metrics.get("loss_curve") or [])
    line = ""
    if role == "speed":
        line = (f"\n\neconomy: a speed cell of class `{metrics.get('quality_class')}`: it trained the class's first "
                f"{steps} of {metrics.get('total_steps')} steps for its own speed and memory; its validation loss, "
                f"accuracy and curves in the results table are those of `{metrics.get('quality_from')}`, which "
                "trained the class to the end.")
    elif role == "quality":
        line = (f"\n\neconomy: the quality run of class `{metrics.get('quality_class')}`: trained to the end; its "
                "validation is shared with the class's speed cells.")
    if metrics.get("diverged_at_step") is not None:
        line += f"\n\nDiverged at step {metrics['diverged_at_step']}: the curve so far is kept."
    return line


def cell_card(cell: dict[str, Any], metrics: dict[str, Any]) -> list:
    from metaflow.cards import Markdown, Table, VegaChart

    settings = (f"{cell['model']} · {cell['peft']} · {cell['strategy']} · {cell['nodes']}x{cell['gpus']} "
                f"on {cell['instance']} · lr {cell['lr']:g} · micro-batch {cell['micro_batch']} x "
                f"accum {cell['grad_accum']} · {cell['precision']} · seq {cell['seq_len']}")
    parts = [Markdown(f"# {cell['cell_id']}\n\n{settings}\n\n**outcome: {metrics.get('outcome')}**"
                      + economy_line(metrics))]
    if metrics.get("error"):
        parts.append(Markdown(f"```\n{metrics['error']}\n```"))
    if metrics.get("loss_curve"):
        parts.append(VegaChart(loss_chart_spec(metrics, "loss")))
    rows = [[label, fmt(metrics.get(key))] for key, label in CARD_METRICS if metrics.get(key) is not None]
    parts.append(Table(rows, headers=["metric", "value"]))
    return parts


# How often the train step's card is redrawn while the cell trains: each redraw is a Metaflow
# card process (about a second of one core), so not so often that it slows a local cell.
LIVE_EVERY_S = float(os.environ.get("FINETUNE_MATRIX_LIVE_CARD_S", "10"))


class LiveCard:
    """The train step's card while the cell trains (Metaflow's card refresh): the loss curve,
    tokens/s and memory so far, from the curves rank 0 appends step by step and the trainer
    processes' resident memory, so `card server` and the Metaflow UI show a running cell."""

    def __init__(self, card: Any, cell: dict[str, Any], out_dir: Any, every_s: float = LIVE_EVERY_S):
        from metaflow.cards import Markdown, VegaChart

        self.card, self.out, self.every, self.last = card, out_dir, every_s, 0.0
        self.title = f"{cell['cell_id']}: training"
        self.chart = VegaChart(loss_chart_spec({}, self.title))
        self.stats = Markdown("starting: no step yet")
        card.append(Markdown(f"# {cell['cell_id']}\n\n{cell['model']} · {cell['peft']} · {cell['strategy']} · "
                             f"{cell['nodes']}x{cell['gpus']} on {cell['instance']} · lr {cell['lr']:g}"))
        card.append(self.chart)
        card.append(self.stats)
        card.refresh(force=True)

    def __call__(self) -> None:
        """Redraw if `every_s` has passed (the launcher calls it at each poll)."""
        import time

        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        self.update()

    def update(self) -> None:
        from pathlib import Path

        from steps.flow import launcher
        from steps.results.metrics import PARTIAL_CURVES

        loss, val = launcher.read_partial(Path(self.out) / PARTIAL_CURVES)
        if not loss:
            return
        curves = {"loss_curve": [p.model_dump() for p in loss], "val_curve": [p.model_dump() for p in val]}
        self.chart.update(loss_chart_spec(curves, self.title))
        span = loss[-1].time_s - loss[0].time_s
        rate = sum(p.tokens for p in loss[1:]) / span if span > 0 else None
        memory = _resident_gb(launcher.trainer_pids(Path(self.out)))
        self.stats.update(f"step **{loss[-1].step}** · loss {loss[-1].loss:.4f} · tokens/s {fmt(rate)} · "
                          f"memory {fmt(memory)} GB (rank processes' resident set)"
                          + (f" · val loss {val[-1].val_loss:.4f} at step {val[-1].step}" if val else ""))
        self.card.refresh(force=True)  # the page itself redrawn: a reload shows the new points

    def finish(self, metrics: dict[str, Any]) -> None:
        """The whole curve and how the cell ended (the gather step's card has every number)."""
        self.chart.update(loss_chart_spec(metrics, self.title.replace("training", metrics.get("outcome") or "ended")))
        self.stats.update(f"**outcome: {metrics.get('outcome')}** · steps {len(metrics.get('loss_curve') or [])} · "
                          f"tokens/s {fmt(metrics.get('tokens_per_s'))} · "
                          f"peak memory {fmt(metrics.get('peak_mem_gb'))} GB")
        self.card.refresh(force=True)


def _resident_gb(pids: list[int]) -> float | None:
    import contextlib

    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 1e9 if total else None
