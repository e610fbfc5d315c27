"""Where the parts of a decoder-only causal LM are, found by structure rather than by one
family's attribute names, so that a pipeline can cut any of them into stages.

Every transformers causal LM is a decoder (the module that owns the list of layers: `model`,
`transformer`, `gpt_neox`, `model.decoder`) inside a head model. The decoder runs some modules
before its layers (token and position embeddings, dropout, rotary tables, projections), the
layers in order, and some after them (the final norm, OPT's output projection); the head
model adds the output embedding (and, for some, logit soft-capping) on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Decoder children that run after the layers, by the names transformers gives them.
FINAL_MODULES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "project_out")


@dataclass(frozen=True)
class Anatomy:
    decoder: nn.Module  # the module whose forward runs the layers
    layers_name: str  # the decoder's attribute holding the layers (a ModuleList)
    before: tuple[str, ...]  # decoder children run before the layers (embeddings, positions, ...)
    after: tuple[str, ...]  # decoder children run after the layers (final norm, projection)
    head: tuple[str, ...]  # children of the causal LM outside the decoder (the output embedding)

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.decoder, self.layers_name)


def _text_config(lm: nn.Module):
    config = lm.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def anatomy(lm: nn.Module) -> Anatomy:
    """The parts of `lm` (a transformers causal LM, PEFT's adapters inside allowed); ValueError
    with the reason when its layout cannot be told apart safely."""
    kind = type(lm).__name__
    n_layers = getattr(_text_config(lm), "num_hidden_layers", None)
    found = [(name, m) for name, m in lm.named_modules()
             if isinstance(m, nn.ModuleList) and n_layers and len(m) == n_layers]
    if len(found) != 1:
        raise ValueError(f"{kind}: cannot find its one list of {n_layers} decoder layers")
    path, _ = found[0]
    decoder_path, _, layers_name = path.rpartition(".")
    decoder = lm.get_submodule(decoder_path) if decoder_path else lm
    if decoder is lm:
        raise ValueError(f"{kind}: its layers are not inside a decoder module")
    before, after = [], []
    for name, child in decoder.named_children():
        if name == layers_name:
            continue
        if name in FINAL_MODULES:
            after.append(name)
        elif "norm" in type(child).__name__.lower() and "emb" not in name:
            # A norm that is neither a known final norm nor an embedding norm: running it on the
            # wrong side of the layers would silently change the model.
            raise ValueError(f"{kind}: cannot tell whether {decoder_path}.{name} runs before or after the layers")
        else:
            before.append(name)
    top = decoder_path.split(".")[0]
    head = tuple(name for name, _ in lm.named_children() if name != top)
    return Anatomy(decoder, layers_name, tuple(before), tuple(after), head)


def stage_parts(lm: nn.Module, parts: Anatomy, lo: int, hi: int, first: bool, last: bool) -> dict[str, nn.Module]:
    """The modules a stage owns (trains and checkpoints), keyed uniquely across stages."""
    own = {f"layer{i}": parts.layers[i] for i in range(lo, hi)}
    if first:
        own |= {f"in_{n}": getattr(parts.decoder, n) for n in parts.before}
    if last:
        own |= {f"out_{n}": getattr(parts.decoder, n) for n in parts.after}
        own |= {f"head_{n}": getattr(lm, n) for n in parts.head}
    return {k: m for k, m in own.items() if isinstance(m, nn.Module)}
