"""`economy:`'s join: each speed cell's row takes its class's quality (validation loss, accuracy,
curves, steps and tokens to target) from the cell that trained the class to the end, and keeps
its own speed, memory and time; its own short curve stays beside it as `speed_curve`."""

from __future__ import annotations

from typing import Any

# What a speed cell takes from its class's quality run.
SHARED = ("val_loss", "accuracy", "token_accuracy", "final_train_loss", "loss_curve", "val_curve",
          "target_loss", "steps_to_target", "tokens_to_target")


def share_quality(records: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """records: (cell, metrics) per cell. A speed cell that finished gets its quality run's
    numbers where that run finished too (else none: its class has no validation), and its time
    to target is the class's steps to target at its own step time."""
    quality = {cell["cell_id"]: m for cell, m in records}
    out = []
    for cell, m in records:
        if m.get("economy_role") == "speed" and m.get("outcome") == "ok":
            m = {**m, "speed_curve": m.get("loss_curve") or []}
            source = quality.get(m.get("quality_from") or "")
            ok = source is not None and source.get("outcome") == "ok"
            m.update({key: source.get(key) if ok else None for key in SHARED})
            m["loss_curve"] = m["loss_curve"] or []
            m["val_curve"] = m["val_curve"] or []
            steps, step_s = m.get("steps_to_target"), m.get("step_s")
            m["time_to_target_s"] = steps * step_s if steps is not None and step_s else None
        out.append((cell, m))
    return out
