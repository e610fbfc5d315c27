"""What a decoder keeps for backward, tensor by tensor, as PyTorch, transformers and PEFT
actually lay it out; no torch. The memory model (`steps.estimate.memory`) adds it to the model
state per rank.

Korthikanti et al.'s 34·s·b·h per layer describes a GPT with a 4h MLP and dropout; a Llama
under PEFT keeps something else. Each term below is one tensor autograd saves, counted in
`tests/test_activation_model.py` against the saved tensors of the real model on CPU (within
2% for every method but DoRA, precision, attention kernel, mask and checkpointing):

- an RMSNorm (transformers) keeps its input upcast to fp32 (4h), and under full fine-tuning
  also its normalised output (the weight's gradient needs it); Liger's kernel keeps the input
  only, in its own width.
- a frozen linear layer keeps nothing; a trained one (full fine-tuning) keeps its input, cast
  to the compute dtype by autocast once per layer that reads it (q, k and v: three copies).
- a LoRA/DoRA layer keeps its input itself, once for the layers that share it: under a 16-bit
  precision the trainer autocasts the fp32 adapters and turns PEFT's cast of the input to their
  dtype off (`steps.trainer.modeling.autocast_dtype`); plus lora_A's output (r wide),
  autocast's 16-bit copy of the adapter weights and, with dropout, its mask (CUDA's fused
  kernel: one byte per element; not checked on CPU, whose dropout keeps an fp32 noise tensor).
  DoRA also keeps the base and adapter outputs (the magnitude scales both). With PEFT's cast
  (`input_cast`, runs measured before the trainer turned it off): one 16-bit copy per adapted
  layer under mixed precision, one fp32 copy under bf16-true (which did not autocast then).
- QLoRA: bitsandbytes' 4-bit matmul keeps its input (the same tensor as the adapters', where
  a layer is adapted); the weights it did not quantize stay in the cell's 16-bit dtype, and
  with them the residual stream.
- attention: SDPA and FlashAttention keep q, k, v, the output and the log-sum-exp; k and v at
  their own (grouped-query) width unless a mask is present (packing, padding), when
  transformers repeats them to every head, and the output is kept again in its own layout.
  Eager attention keeps the softmax (fp32) and its cast: heads·s values per token.
- the gated MLP keeps the gate's output, its SiLU and the up projection (Liger's SwiGLU: the
  two projections only); the down projection's input if it is trained or adapted.
- compiled layers (`train.compile`): one copy per distinct input, and the recomputable
  pointwise work (norm, SiLU) recomputed, as the min-cut partitioner does.
- gradient checkpointing keeps each layer's input (and nothing of its weights' copies), and
  rebuilds one layer at a time.
- LoRA's kernels (`train.lora_kernels`): an adapted projection keeps its input itself, once for
  the layers that share it, and nothing else (no cast copies, no lora_A output, no copies of
  the adapters, no dequantized 4-bit weights); a SwiGLU MLP whose three projections are adapted
  keeps its input, gate and up (not the SiLU, nor the down projection's input), in the
  activations' width. With dropout, each adapted layer keeps its mask too: one byte per
  element of its input.
- the loss, at its peak (the start of backward): the fp32 log-softmax, its incoming and
  outgoing gradients, 12 bytes per vocabulary entry per token; with `train.loss: chunked`, the
  final hidden states and one chunk's worth.
- full fine-tuning under mixed precision: autocast's 16-bit copy of every weight, kept for
  backward (2 bytes per parameter); DoRA: what its norm's identity pass keeps (measured, not
  derived: DoRA is checked within 5%, the rest within 2%).

Other architectures are counted as if they were Llama-shaped with their own hidden, MLP,
head and vocabulary sizes (an approximation, not checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

ALL_LINEAR = "all-linear"
# The linear layers of a Llama-style decoder layer, grouped by the input they share.
ATTN_IN, ATTN_OUT = ("q_proj", "k_proj", "v_proj"), ("o_proj",)
MLP_IN, MLP_OUT = ("gate_proj", "up_proj"), ("down_proj",)
# PEFT's default LoRA targets for the architectures the presets use.
PEFT_DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                        "qwen2": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


@dataclass(frozen=True)
class DecoderShape:
    """The sizes that decide a Llama-style decoder's activations."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    model_type: str = "llama"
    tied: bool = False  # the head shares the embeddings' weights

    @classmethod
    def of(cls, arch: dict[str, Any]) -> DecoderShape:
        h = int(arch["hidden_size"])
        heads = int(arch["num_attention_heads"])
        return cls(hidden=h, intermediate=int(arch.get("intermediate_size") or 4 * h),
                   layers=int(arch["num_hidden_layers"]), heads=heads,
                   kv_heads=int(arch.get("num_key_value_heads") or heads), vocab=int(arch["vocab_size"]),
                   model_type=str(arch.get("model_type", "llama")),
                   tied=bool(arch.get("tie_word_embeddings", False)))

    @property
    def kv_hidden(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> dict[str, tuple[int, int]]:
        """Every linear layer of a decoder layer: (in features, out features)."""
        h, kv, i = self.hidden, self.kv_hidden, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


@dataclass(frozen=True)
class Kernels:
    """The cell's choices that change what is kept: its precision and method, the attention
    implementation and whether a mask reaches it, fused kernels, compilation, checkpointing."""

    method: str  # full, lora, dora, qlora
    precision: str  # fp32, bf16-mixed, fp16-mixed, bf16-true
    attention: str = "sdpa"  # sdpa, eager, flash_attention_2, flex_attention
    masked: bool = True  # padding or packing: transformers hands SDPA a mask
    liger: bool = False
    compiled: bool = False
    checkpointed: bool = False
    targets: frozenset[str] = frozenset()  # the adapted linear layers of a decoder layer
    lora_r: int = 8
    lora_dropout: float = 0.0
    loss_chunk: int = 0  # train.loss: chunked, tokens per chunk; 0: the loss from whole logits
    # DeepSpeed casts the whole module, adapters included, to its 16-bit dtype (and autocast is
    # off): PEFT's cast of a layer's input to the adapter's dtype copies nothing.
    adapters16: bool = False
    # train.lora_kernels: an adapted projection keeps its input only; a SwiGLU MLP whose three
    # projections are adapted keeps its input, gate and up (steps.trainer.lora_kernels).
    lora_kernels: bool = False
    # PEFT's cast of each adapted layer's input to the adapters' dtype, with no autocast under
    # bf16-true: what the trainer did before it computed adapters in 16 bits (LoRA and DoRA runs
    # measured then, such as the H100 bench).
    input_cast: bool = False

    def __post_init__(self) -> None:
        # The kernels route plain LoRA only (elsewhere PEFT runs: steps.plan.lora_kernels).
        if self.method not in ("lora", "qlora"):
            object.__setattr__(self, "lora_kernels", False)

    @property
    def full(self) -> bool:
        return self.method == "full"

    @property
    def mixed(self) -> bool:
        return self.precision in ("bf16-mixed", "fp16-mixed")

    @property
    def autocast(self) -> bool:
        """Matmuls autocast to 16 bits: mixed precision, and bf16-true adapters (fp32 master
        weights computed in bf16), but not under DeepSpeed (which casts the adapters to bf16)."""
        return self.mixed or (self.precision == "bf16-true" and not self.full and not self.adapters16
                              and not self.input_cast)

    @property
    def act(self) -> int:
        """Bytes of an activation: 16-bit under any 16-bit precision, fp32 otherwise."""
        return 4 if self.precision == "fp32" else 2

    @property
    def fused_mlp(self) -> bool:
        """The kernels' SwiGLU: all three MLP projections adapted."""
        return self.lora_kernels and set(MLP_IN + MLP_OUT) <= self.targets

    @property
    def residual(self) -> int:
        """Bytes of the residual stream: fp32 under full fine-tuning with mixed precision (fp32
        master embeddings and norms), the weights' width otherwise."""
        return 4 if self.precision == "fp32" or (self.full and self.mixed) else 2


def adapted(targets: Any, names: list[str] | tuple[str, ...], model_type: str) -> frozenset[str]:
    """Which of a layer's linear `names` PEFT adapts for a `target_modules` setting (unset:
    PEFT's default for the architecture; a list: names that end in one; "all-linear"; any other
    string: a regular expression over the full module name)."""
    if targets is None or (isinstance(targets, float) and targets != targets):
        targets = PEFT_DEFAULT_TARGETS.get(model_type, ALL_LINEAR)
    if isinstance(targets, str) and targets.startswith("["):
        targets = [t.strip(" '\"") for t in targets.strip("[]").split(",") if t.strip()]
    if targets == ALL_LINEAR:
        return frozenset(names)
    if isinstance(targets, str):
        parent = {n: ("self_attn" if n in ATTN_IN + ATTN_OUT else "mlp") for n in names}
        return frozenset(n for n in names if re.fullmatch(targets, f"model.layers.0.{parent[n]}.{n}"))
    return frozenset(n for n in names if any(t == n or t.endswith("." + n) for t in targets))


def _input_copies(k: Kernels, group: tuple[str, ...], width_in: int, sdpa_output: bool = False) -> float:
    """Bytes per token kept for the input of the linear layers in `group`, which share it."""
    if k.lora_kernels:  # the input itself, once (attention's output: kept by SDPA already)
        hit = any(n in k.targets for n in group)
        fused_away = group == MLP_OUT and k.fused_mlp  # recomputed from gate and up
        return 0 if not hit or fused_away or sdpa_output else k.act * width_in
    if k.full:
        if k.mixed and not sdpa_output:
            copies = 1 if k.compiled else len(group)
            return copies * 2 * width_in  # autocast's 16-bit copy per layer that reads it
        return 0 if sdpa_output else k.residual * width_in  # the input itself (attention keeps its output)
    hit = [n for n in group if n in k.targets]
    quantized = k.method == "qlora" and k.precision != "fp32"  # bitsandbytes' matmul keeps its input
    if not hit and not quantized:
        return 0
    if not hit or not k.input_cast or k.precision == "fp32" or k.adapters16:
        return 0 if sdpa_output else k.act * width_in  # the input itself, shared
    copy = 4 if k.precision == "bf16-true" else 2  # PEFT's fp32 cast; under autocast its 16-bit cast
    return (1 if k.compiled else len(hit)) * copy * width_in


def per_layer_token(shape: DecoderShape, k: Kernels, seq_len: int) -> float:
    """Bytes one decoder layer keeps for backward per token, with nothing recomputed."""
    h, kv, i, a = shape.hidden, shape.kv_hidden, shape.intermediate, k.act
    fused_pointwise = k.liger or k.compiled
    # Two RMSNorms.
    norm = k.residual * h if fused_pointwise else 4 * h + (k.residual * h if k.full else 0)
    total = 2 * norm + 2 * 4  # and their 1/rms per token
    # Linear inputs.
    total += _input_copies(k, ATTN_IN, h) + _input_copies(k, MLP_IN, h)
    total += _input_copies(k, ATTN_OUT, h, sdpa_output=k.attention != "eager")
    total += _input_copies(k, MLP_OUT, i)
    # Attention.
    repeated = k.masked and k.attention in ("sdpa", "eager")
    kv_width = h if repeated or k.attention == "eager" else kv
    if k.attention == "eager":
        scores = shape.heads * seq_len * (4 if k.precision == "fp32" else 6)
        total += a * h + 2 * a * kv_width + scores  # q, repeated k and v, softmax and its cast
    else:
        total += 2 * a * h + 2 * a * kv_width + 4 * shape.heads  # q, out, k, v, log-sum-exp
        if k.masked and k.attention == "sdpa":
            total += a * h
    # Gated MLP: gate output, SiLU, up output (fused kernels recompute the SiLU).
    if k.fused_mlp:
        total += 2 * a * i
    else:
        total += (2 if fused_pointwise else 3) * a * i
    if k.lora_kernels:  # nor lora_A's output, nor bitsandbytes' copies; dropout's mask, a byte an input
        linears = shape.linears()
        return total + (sum(linears[n][0] for n in k.targets) if k.lora_dropout > 0 else 0)
    # Adapters.
    if not k.full:
        linears = shape.linears()
        adapter = 2 if k.autocast or k.adapters16 else 4  # lora_A's output
        uncast = not k.input_cast or k.precision == "fp32" or k.adapters16
        for name in k.targets:
            fan_in, fan_out = linears[name]
            total += adapter * k.lora_r
            if k.lora_dropout > 0:  # the mask (and, where the input was not cast, a new input)
                total += fan_in * (1 + (k.act if uncast else 0))
            if k.method == "dora":
                total += 2 * a * fan_out
    return total


def fixed_per_layer(shape: DecoderShape, k: Kernels) -> float:
    """Bytes per decoder layer kept whatever the batch: autocast's copies of trained weights,
    DoRA's merged weights."""
    linears = shape.linears()
    if k.lora_kernels:  # backward recasts and dequantizes again: nothing kept
        return 0.0
    # autocast's 16-bit copies of the fp32 adapters
    casts = 2 * k.lora_r * sum(a + b for n, (a, b) in linears.items() if n in k.targets) if k.autocast else 0
    if k.full and k.mixed:
        return 2 * sum(a * b for a, b in linears.values())
    if k.method == "dora":
        # PEFT passes an identity matrix (in x in) through lora_A to build the merged weight's
        # norm; what it keeps comes to about half a byte per entry per activation byte.
        return casts + k.act / 2 * sum(a * a for n, (a, _) in linears.items() if n in k.targets)
    return casts


def outside_per_token(shape: DecoderShape, k: Kernels, seq_len: int) -> float:
    """Bytes per token outside the layers at the loss's peak: the fp32 log-softmax with its
    incoming and outgoing gradients; the rotary cos and sin (fp32, per position id; inside the
    checkpoints under checkpointing); the attention mask (one byte per key); under full
    fine-tuning the final norm and the head's input."""
    # the logits' 12 bytes per vocabulary entry; chunked, the final hidden states instead
    # (`activation_bytes` adds one chunk's logits)
    if k.loss_chunk:
        total = 0 if k.full else k.residual * shape.hidden
    else:
        total = 12 * shape.vocab
    total += seq_len if k.masked else 0
    if not k.checkpointed:
        total += 8 * (shape.hidden // shape.heads)
    elif not k.full:
        # the final norm's fp32 input, no longer offset by the first layer's (in its checkpoint)
        total += 4 * shape.hidden
    if k.full:  # the final norm (kept by its weight) and, unchunked, the head's input
        head_input = 0 if k.loss_chunk else (2 if k.mixed else k.residual)
        total += (k.residual + 4 + head_input) * shape.hidden
    return total


def activation_bytes(shape: DecoderShape, k: Kernels, seq_len: int, micro_batch: int) -> float:
    """Everything above the model state at the step's peak, for one micro-batch on one rank
    holding every layer."""
    tokens = seq_len * micro_batch
    layer = per_layer_token(shape, k, seq_len) * tokens + fixed_per_layer(shape, k)
    if k.checkpointed:  # every layer's input, and one layer rebuilt at a time
        kept = shape.layers * k.residual * shape.hidden * tokens + layer
    else:
        kept = shape.layers * layer
    # autocast's 16-bit copy of full fine-tuning's fp32 head
    head = 2.0 * shape.vocab * shape.hidden if k.mixed and k.full else 0.0
    chunk = 12.0 * shape.vocab * min(k.loss_chunk, tokens) if k.loss_chunk else 0.0  # one chunk's logits
    return kept + outside_per_token(shape, k, seq_len) * tokens + head + chunk
