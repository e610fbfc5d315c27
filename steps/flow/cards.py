"""A Metaflow card per cell: what it was, how it ended, its loss curve and its numbers."""

from __future__ import annotations

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
