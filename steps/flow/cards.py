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
    # a cell that ran as a job (SageMaker, Slurm): which, where, how it ended, how long it queued
    ("job_name", "job"), ("job_id", "Slurm job id"), ("job_nodes", "nodes"), ("job_status", "job status"),
    ("queued_s", "queued s"),
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


# How often the train step's card is redrawn while the cell trains. Each redraw is two Metaflow
# card processes of about half a second of one core each, started from a thread of low priority
# (`priority`). Where the cell trains on this machine's CPU, cores its ranks (or the cells beside
# it) hold would pay for them anyway: its ranks step together, and a process that shares a core
# with one slows them all (the last DDP cell of `make run`, redrawn every 10 s, stepped 10-15%
# slower than the first). Such a cell is redrawn every minute (Metaflow's own default), under 1%
# of a core. FINETUNE_MATRIX_LIVE_CARD_S sets one interval for every cell.
LIVE_EVERY_S = 10.0
LIVE_EVERY_CPU_S = 60.0


def live_every_s(cell: dict[str, Any]) -> float:
    """The live card's redraw interval for `cell` (see LIVE_EVERY_S)."""
    if os.environ.get("FINETUNE_MATRIX_LIVE_CARD_S"):
        return float(os.environ["FINETUNE_MATRIX_LIVE_CARD_S"])
    from steps.plan import catalog

    instance = catalog.instances().get(cell["instance"])
    return LIVE_EVERY_CPU_S if instance is not None and instance.local else LIVE_EVERY_S


class LiveCard:
    """The train step's card while the cell trains (Metaflow's card refresh): the loss curve,
    tokens/s and memory so far, from the curves rank 0 appends step by step and the trainer
    processes' resident memory, so `card server` and the Metaflow UI show a running cell.
    Drawn every `every_s` from its own thread until `finish`; a card that cannot be drawn is
    one warning in the log, never the cell's failure."""

    def __init__(self, card: Any, cell: dict[str, Any], out_dir: Any, every_s: float | None = None,
                 ranks_here: bool = True):
        import threading

        from metaflow.cards import Markdown, VegaChart

        self.card, self.out, self.every = card, out_dir, every_s or live_every_s(cell)
        self.ranks_here = ranks_here  # a Slurm job's ranks run on other nodes: their pids mean nothing here
        self.title = f"{cell['cell_id']}: training"
        self.chart = VegaChart(loss_chart_spec({}, self.title))
        self.stats = Markdown("starting: no step yet")
        card.append(Markdown(f"# {cell['cell_id']}\n\n{cell['model']} · {cell['peft']} · {cell['strategy']} · "
                             f"{cell['nodes']}x{cell['gpus']} on {cell['instance']} · lr {cell['lr']:g}"))
        card.append(self.chart)
        card.append(self.stats)
        self.stopped = threading.Event()
        self.drawing = threading.Lock()  # one redraw at a time: the thread's or `finish`'s
        self.thread = threading.Thread(target=self._run, name="live-card", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from steps.flow import priority

        priority.lower(thread_only=True)  # this thread, and the card processes it starts
        try:
            with self.drawing:
                self.card.refresh(force=True)
            while not self.stopped.wait(self.every):
                self.update()
        except Exception as exc:  # noqa: BLE001 - a card must not stop the cell
            print(f"warning: the live card could not be drawn ({type(exc).__name__}: {exc})", flush=True)

    def update(self) -> None:
        from pathlib import Path

        from steps.flow import launcher
        from steps.results.metrics import PARTIAL_CURVES

        loss, val = launcher.read_partial(Path(self.out) / PARTIAL_CURVES)
        if not loss:
            return
        curves = {"loss_curve": [p.model_dump() for p in loss], "val_curve": [p.model_dump() for p in val]}
        span = loss[-1].time_s - loss[0].time_s
        rate = sum(p.tokens for p in loss[1:]) / span if span > 0 else None
        memory = _resident_gb(launcher.trainer_pids(Path(self.out))) if self.ranks_here else None
        with self.drawing:
            if self.stopped.is_set():
                return
            self.chart.update(loss_chart_spec(curves, self.title))
            self.stats.update(f"step **{loss[-1].step}** · loss {loss[-1].loss:.4f} · tokens/s {fmt(rate)} · "
                              f"memory {fmt(memory)} GB (rank processes' resident set)"
                              + (f" · val loss {val[-1].val_loss:.4f} at step {val[-1].step}" if val else ""))
            self.card.refresh(force=True)  # the page itself redrawn: a reload shows the new points

    def finish(self, metrics: dict[str, Any]) -> None:
        """The whole curve and how the cell ended (the gather step's card has every number)."""
        self.stopped.set()
        title = self.title.replace("training", metrics.get("outcome") or "ended")
        try:
            with self.drawing:
                self.chart.update(loss_chart_spec(metrics, title))
                self.stats.update(f"**outcome: {metrics.get('outcome')}** · "
                                  f"steps {len(metrics.get('loss_curve') or [])} · "
                                  f"tokens/s {fmt(metrics.get('tokens_per_s'))} · "
                                  f"peak memory {fmt(metrics.get('peak_mem_gb'))} GB")
                self.card.refresh(force=True)
        except Exception as exc:  # noqa: BLE001 - as in `_run`
            print(f"warning: the live card could not be drawn ({type(exc).__name__}: {exc})", flush=True)


def _resident_gb(pids: list[int]) -> float | None:
    import contextlib

    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 1e9 if total else None
