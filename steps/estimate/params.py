"""Parameter counts and training FLOPs of a cell, from its model's shape alone (no torch): what
the planner predicts with before anything is loaded. `tests/test_planner.py` checks the counts
against PEFT's own on the real models (built on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from steps.estimate.activations import DecoderShape, adapted


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter (4-bit weights counted by the elements they stand for)
    trainable: int
    embedding: int  # input-embedding parameters (lookups, not matmuls)


def counts(arch: dict[str, Any], peft: str, lora_r: int, targets: Any) -> ParamCounts:
    """A Llama-style decoder's parameters: embeddings, per layer q/k/v/o, the gated MLP and two
    norms, the final norm, an untied head; with LoRA r x (in + out) per adapted layer, and
    DoRA's magnitude vector (out) besides."""
    shape = DecoderShape.of(arch)
    h, vocab = shape.hidden, shape.vocab
    linears = shape.linears()
    per_layer = sum(a * b for a, b in linears.values()) + 2 * h
    tied = bool(arch.get("tie_word_embeddings", False))
    base = vocab * h + shape.layers * per_layer + h + (0 if tied else vocab * h)
    if peft == "full":
        return ParamCounts(base, base, vocab * h)
    chosen = adapted(targets, list(linears), shape.model_type)
    adapter = sum(lora_r * (linears[n][0] + linears[n][1]) + (linears[n][1] if peft == "dora" else 0)
                  for n in chosen) * shape.layers
    return ParamCounts(base + adapter, adapter, vocab * h)


def flops_per_token(layers: int, heads: int, head_dim: int, trainable: int, frozen: int, embedding: int,
                    seq_len: float, full: bool) -> float:
    """Training FLOPs per token (PaLM appendix B convention).

    Weights: 6N when every weight gets a gradient; with a frozen base, 4N_frozen (forward and
    input gradients, no weight gradients) + 6N_trainable. Input embeddings are lookups, not
    matmuls, and are left out. Attention score and value matmuls have no weights, so their
    12*L*H*Q*T (forward + backward) is the same in both cases.
    """
    attention = 12 * layers * heads * head_dim * seq_len
    if full:
        return 6 * (trainable - embedding) + attention
    return 4 * (frozen - embedding) + 6 * trainable + attention
