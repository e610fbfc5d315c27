"""The pipeline finds a causal LM's parts by structure: the decoder that owns the layer list,
what runs before the layers and what after; a layout it cannot tell apart is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from steps.trainer import split


def _tiny(kind: str, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config))


@pytest.mark.parametrize("kind,config,decoder,layers,before,after,head", [
    ("llama", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4),
     "LlamaModel", "layers", ("embed_tokens", "rotary_emb"), ("norm",), ("lm_head",)),
    ("gpt2", dict(n_layer=2, n_embd=32, n_head=4),
     "GPT2Model", "h", ("wte", "wpe", "drop"), ("ln_f",), ("lm_head",)),
    ("opt", dict(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=16),
     "OPTDecoder", "layers", ("embed_tokens", "embed_positions", "project_in"), ("project_out", "final_layer_norm"),
     ("lm_head",)),
])
def test_the_parts_of_a_causal_lm_are_found_by_structure(kind, config, decoder, layers, before, after, head):
    parts = split.anatomy(_tiny(kind, **config))
    assert type(parts.decoder).__name__ == decoder and parts.layers_name == layers
    assert (parts.before, parts.after, parts.head) == (before, after, head)


def test_a_norm_on_an_unknown_side_of_the_layers_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                          num_attention_heads=4))
    lm.model.post_norm = nn.LayerNorm(32)
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM: cannot tell whether model.post_norm runs "
                                         r"before or after the layers$"):
        split.anatomy(lm)


def test_the_stage_parts_are_keyed_apart_across_stages():
    lm = _tiny("gpt2", n_layer=4, n_embd=32, n_head=4)
    parts = split.anatomy(lm)
    stages = [split.stage_parts(lm, parts, lo, hi, lo == 0, hi == 4) for lo, hi in ((0, 2), (2, 3), (3, 4))]
    assert [sorted(s) for s in stages] == [["in_drop", "in_wpe", "in_wte", "layer0", "layer1"], ["layer2"],
                                           ["head_lm_head", "layer3", "out_ln_f"]]
