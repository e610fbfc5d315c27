"""What the training loop has measured so far, kept in one place: checkpoints save it (so that a
resumed run continues its curves, times and token counts), the heartbeat streams its curves, and
the summary turns it into the cell's metrics. No torch here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from steps.results.metrics import LossPoint, ValPoint


@dataclass(frozen=True)
class Target:
    """When the loss first reached `train.target_loss`."""

    step: int
    time_s: float  # training time at that step
    tokens: float  # tokens trained on until then


@dataclass
class Progress:
    loss_curve: list[LossPoint] = field(default_factory=list)
    val_curve: list[ValPoint] = field(default_factory=list)
    train_s: float = 0.0  # training time (evaluation and checkpoints excluded) at the last save or the end
    # Steps after the timing warm-up: global tokens, seconds and count, what throughput is from.
    timed_tokens: float = 0.0
    timed_s: float = 0.0
    timed_steps: int = 0
    # The warm-up steps, reported apart.
    warm_tokens: float = 0.0
    warm_s: float = 0.0
    # This rank's real tokens and sequences of the timed steps: the mean sequence length.
    seq_tokens: float = 0.0
    seq_count: float = 0.0
    target: Target | None = None

    def add_step(self, point: LossPoint, seconds: float, warm: bool, seq_tokens: float, sequences: int) -> None:
        """Count one optimizer step that took `seconds` (a warm-up step apart from the timed ones)."""
        if warm:
            self.warm_tokens += point.tokens
            self.warm_s += seconds
        else:
            self.timed_tokens += point.tokens
            self.timed_s += seconds
            self.timed_steps += 1
            self.seq_tokens += seq_tokens
            self.seq_count += sequences
        self.loss_curve.append(point)

    @property
    def tokens_per_s(self) -> float | None:
        """Global tokens per second of the timed steps."""
        return self.timed_tokens / self.timed_s if self.timed_s else None

    @property
    def warm_tokens_per_s(self) -> float | None:
        return self.warm_tokens / self.warm_s if self.warm_s else None

    @property
    def step_s(self) -> float | None:
        """Mean seconds per timed step."""
        return self.timed_s / self.timed_steps if self.timed_steps else None

    @property
    def mean_seq_tokens(self) -> float:
        """Real (unpadded) tokens per sequence, what attention FLOPs scale with."""
        return self.seq_tokens / max(self.seq_count, 1)

    def check_target(self, target_loss: float | None, on_val: bool) -> None:
        """Record the first point whose loss reaches `target_loss`: on the validation curve when
        the cell evaluates during training (`on_val`), else on the training curve."""
        if target_loss is None or self.target is not None:
            return
        points = ([(p.step, p.time_s, p.val_loss) for p in self.val_curve] if on_val
                  else [(p.step, p.time_s, p.loss) for p in self.loss_curve])
        for step, time_s, loss in points:
            if loss <= target_loss:
                tokens = sum(c.tokens for c in self.loss_curve if c.step <= step)
                self.target = Target(step, time_s, tokens)
                return

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for a checkpoint."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(loss_curve=[p.model_dump() for p in self.loss_curve],
                   val_curve=[p.model_dump() for p in self.val_curve],
                   target=asdict(self.target) if self.target else None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(**{**data, "loss_curve": [LossPoint(**p) for p in data["loss_curve"]],
                      "val_curve": [ValPoint(**p) for p in data["val_curve"]],
                      "target": Target(**data["target"]) if data["target"] else None})
