"""LoRA's forward and backward written out (`train.lora_kernels`), as Unsloth and Axolotl do.

PEFT runs an adapted projection as autograd sees it: the frozen matmul, then `lora_A`, `lora_B`
and the scaling as separate ops, each keeping its input for backward; a SwiGLU MLP keeps
`silu(gate)` and `silu(gate) * up` besides `gate` and `up`. Here:

- an adapted projection is one autograd function: the frozen matmul and the low-rank path in
  one forward, keeping only its input; backward recomputes `x A^T` (r columns, cheap) and, for
  QLoRA, dequantizes the 4-bit weight again instead of keeping it;
- a Llama-style MLP whose three projections are adapted (gate, up, down; SiLU) is one autograd
  function keeping `x`, `gate` and `up` only: `silu(gate) * up` is recomputed in backward, two
  intermediate-sized tensors per token fewer than PEFT (`steps.estimate.activations` counts it).

The maths is PEFT's (`y = x W^T + (drop(x) A^T) B^T * scaling`, no bias): losses and every
gradient equal PEFT's within 1e-5 relative in fp32 (`tests/test_lora_kernels.py`). Dropout
(`train.lora.dropout`) is PEFT's own draw: the same `F.dropout` call, in the same order and dtype,
takes the same random numbers, so the mask is PEFT's; it is kept as one byte per element (what
CUDA's fused dropout keeps) and backward rebuilds the scaled mask from it. Autocast is kept:
backward runs under the forward's autocast state. Where a module is not the plain case (DoRA, a
bias, merged or disabled adapters, several adapters) its own forward runs. The modules must be
whole when they run: the kernels read `lora_A.weight` and friends without calling those modules,
so under ZeRO-3 (which gathers a module's weights as it is called) and tensor parallelism (which
splits them) a cell runs PEFT's modules instead (`steps.plan.lora_kernels`).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

ADAPTER = "default"
SILU = ("SiLU", "SiLUActivation")  # torch's module and transformers' (both F.silu)


# ---------------------------------------------------------------- the frozen weight
def _quantized(base: torch.nn.Module) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


def _compute_dtype(base: torch.nn.Module, x: torch.Tensor) -> torch.dtype:
    """bitsandbytes' Linear4bit computes in its compute dtype (the input's where unset)."""
    return getattr(base, "compute_dtype", None) or x.dtype


def frozen_weight(base: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The base layer's weight as its matmul uses it: bitsandbytes' 4-bit weight dequantized (a
    temporary: never saved for backward), else the weight itself."""
    if not _quantized(base):
        return base.weight
    import bitsandbytes as bnb

    weight = base.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype or weight.quant_state.dtype)


class _Autocast:
    """The forward's autocast state, for backward to run under (what torch.amp.custom_bwd does,
    for whichever device the cell trains on)."""

    def __init__(self, x: torch.Tensor):
        self.device = x.device.type
        self.enabled = torch.is_autocast_enabled(self.device)
        self.dtype = torch.get_autocast_dtype(self.device) if self.enabled else None

    def __call__(self):
        return torch.autocast(self.device, dtype=self.dtype, enabled=self.enabled)


# ---------------------------------------------------------------- one adapted projection
def _frozen(x: torch.Tensor, base: torch.nn.Module) -> torch.Tensor:
    """x W^T as the base layer computes it (bitsandbytes: in its compute dtype, returned in x's)."""
    if not _quantized(base):
        return F.linear(x, base.weight)
    dtype = _compute_dtype(base, x)
    return F.linear(x.to(dtype), frozen_weight(base, dtype)).to(x.dtype)


def _as_adapter(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x as PEFT hands it to lora_A: cast to A's dtype. Under autocast the matmul casts it to the
    autocast dtype anyway, and a 16-bit x cast up and back down is itself: skip the fp32 copy."""
    return x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)


def _noise(x: torch.Tensor, a: torch.Tensor, drop: tuple[float, bool]) -> torch.Tensor | None:
    """PEFT's dropout of x as a multiplier (0 or 1/(1-p)); None without dropout. Drawn as PEFT's
    `F.dropout` draws it, for a tensor of x's shape in the dtype PEFT drops out in (`_dropout`):
    the same random numbers, so the same mask, and the same values, since dropout multiplies
    its input by this tensor. On a CPU that is ATen's own `bernoulli_(1 - p)` then `div_(1 - p)`
    (no tensor of ones to fill and multiply: a third of dropout's time there); elsewhere
    `F.dropout` of ones (CUDA's fused kernel draws in its own way)."""
    p, casts = drop
    if not p:
        return None
    dtype = a.dtype if casts else x.dtype
    if x.device.type == "cpu":
        return torch.empty(x.shape, dtype=dtype).bernoulli_(1 - p).div_(1 - p)
    return F.dropout(torch.ones(x.shape, dtype=dtype, device=x.device), p, True)


def _kept(noise: torch.Tensor | None) -> torch.Tensor | None:
    """What backward keeps of the noise: its mask, one byte per element."""
    return None if noise is None else noise != 0


def _rebuilt(mask: torch.Tensor | None, dtype: torch.dtype, p: float) -> torch.Tensor | None:
    """The noise again from its mask, by dropout's own ops (0 or 1, divided by 1 - p)."""
    return None if mask is None else mask.to(dtype).div_(1 - p)


def _dropped(x, a, noise):
    """x as lora_A reads it: cast as PEFT casts it, times dropout's noise."""
    x = _as_adapter(x, a)
    return x if noise is None else x * noise


def _lora(x, base, a, b, scaling, noise=None):
    """PEFT's forward, op for op: the frozen matmul; x cast to A's dtype and dropped out,
    (x A^T) B^T * scaling added; the sum in the frozen matmul's dtype."""
    out = _frozen(x, base)
    return (out + F.linear(F.linear(_dropped(x, a, noise), a), b) * scaling).to(out.dtype)


def _matmul_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _lora_backward(grad, x, base, a, b, scaling, need_x: bool, noise=None):
    """(dx, dA, dB) of `_lora` at `x`, recomputing x A^T (r columns) and, for a 4-bit weight,
    its dequantization; dropout's `noise` scales lora_A's input and its gradient."""
    x2, g2 = _matmul_2d(_dropped(x, a, noise)), _matmul_2d(grad)
    xa = F.linear(x2, a)
    g_lora = g2.to(xa.dtype) * scaling
    d_b = g_lora.t() @ xa if b.requires_grad else None
    g_xa = g_lora @ b.to(g_lora.dtype)
    d_a = g_xa.t() @ x2.to(g_xa.dtype) if a.requires_grad else None
    d_x = None
    if need_x:
        dtype = _compute_dtype(base, x) if _quantized(base) else base.weight.dtype
        d_x = (g2.to(dtype) @ frozen_weight(base, dtype)).to(x.dtype)
        d_lora = g_xa @ a.to(g_xa.dtype)
        if noise is not None:
            d_lora = d_lora * _matmul_2d(noise)
        d_x = (d_x + d_lora.to(x.dtype)).reshape(x.shape)
    return d_x, d_a, d_b


class LoraLinear(torch.autograd.Function):
    """y = x W^T + (drop(x) A^T) B^T * scaling, keeping x (and dropout's mask) only."""

    @staticmethod
    def forward(ctx, x, a, b, base, scaling, drop):
        ctx.base, ctx.scaling, ctx.p, ctx.autocast = base, scaling, drop[0], _Autocast(x)
        noise = _noise(x, a, drop)
        ctx.noise_dtype = None if noise is None else noise.dtype
        ctx.save_for_backward(x, a, b, _kept(noise))
        return _lora(x, base, a, b, scaling, noise)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, mask = ctx.saved_tensors
        noise = _rebuilt(mask, ctx.noise_dtype, ctx.p)
        with ctx.autocast():
            d_x, d_a, d_b = _lora_backward(grad, x, ctx.base, a, b, ctx.scaling, ctx.needs_input_grad[0], noise)
        return d_x, d_a, d_b, None, None, None


# ---------------------------------------------------------------- a SwiGLU MLP, all three adapted
class LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection LoRA-adapted; keeps x, gate(x) and up(x)
    (and the three dropout masks). Dropout draws in PEFT's order: gate, up, down."""

    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, bases, scalings, drops):
        ctx.bases, ctx.scalings, ctx.ps, ctx.autocast = bases, scalings, [p for p, _ in drops], _Autocast(x)
        (gate_base, up_base, down_base), (gs, us, ds), (g_drop, u_drop, d_drop) = bases, scalings, drops
        gate_noise = _noise(x, ga, g_drop)
        gate = _lora(x, gate_base, ga, gb, gs, gate_noise)
        up_noise = _noise(x, ua, u_drop)
        up = _lora(x, up_base, ua, ub, us, up_noise)
        hidden = F.silu(gate) * up
        down_noise = _noise(hidden, da, d_drop)
        noises = (gate_noise, up_noise, down_noise)
        ctx.noise_dtypes = tuple(None if n is None else n.dtype for n in noises)
        ctx.save_for_backward(x, gate, up, ga, gb, ua, ub, da, db, *(_kept(n) for n in noises))
        return _lora(hidden, down_base, da, db, ds, down_noise)

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, ga, gb, ua, ub, da, db, *masks = ctx.saved_tensors
        gn, un, dn = (_rebuilt(m, t, p) for m, t, p in zip(masks, ctx.noise_dtypes, ctx.ps, strict=True))
        (gate_base, up_base, down_base), (gs, us, ds) = ctx.bases, ctx.scalings
        with ctx.autocast():
            silu = F.silu(gate)
            hidden = silu * up  # recomputed, not kept: the same ops as forward, the same values
            d_hidden, d_da, d_db = _lora_backward(grad, hidden, down_base, da, db, ds, True, dn)
            d_up = d_hidden * silu
            d_gate = torch.ops.aten.silu_backward(d_hidden * up, gate)  # autograd's own SiLU backward
            dx_g, d_ga, d_gb = _lora_backward(d_gate, x, gate_base, ga, gb, gs, ctx.needs_input_grad[0], gn)
            dx_u, d_ua, d_ub = _lora_backward(d_up, x, up_base, ua, ub, us, ctx.needs_input_grad[0], un)
        d_x = dx_g + dx_u if ctx.needs_input_grad[0] else None
        return d_x, d_ga, d_gb, d_ua, d_ub, d_da, d_db, None, None, None


# ---------------------------------------------------------------- patching a PEFT model
def _adapted(module: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a linear layer: `lora.Linear`, or QLoRA's `Linear4bit`."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit")


def _plain(module: torch.nn.Module) -> bool:
    """A PEFT LoRA Linear in the case the kernels compute: one active adapter, plain LoRA (no
    DoRA), PEFT's dropout or none, no bias, not merged or disabled."""
    if not _adapted(module) or module.disable_adapters or module.merged:
        return False
    if list(module.active_adapters) != [ADAPTER] or ADAPTER not in module.lora_A:
        return False
    if ADAPTER in getattr(module, "lora_variant", {}) or module.use_dora.get(ADAPTER, False):
        return False
    if type(module.lora_dropout[ADAPTER]) not in (torch.nn.Identity, torch.nn.Dropout):
        return False
    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or module.fan_in_fan_out:  # GPT-2's Conv1D: W transposed
        return False
    return base.bias is None and module.lora_A[ADAPTER].bias is None and module.lora_B[ADAPTER].bias is None


def _dropout(module) -> tuple[float, bool]:
    """Dropout as PEFT's module runs it now: its probability (0 in evaluation), and whether it
    drops x out after casting it to A's dtype (PEFT's cast, unless the trainer turned it off or
    bitsandbytes' layer skips it under CUDA autocast) rather than in x's own."""
    drop = module.lora_dropout[ADAPTER]
    p = drop.p if isinstance(drop, torch.nn.Dropout) and drop.training else 0.0
    skipped = type(module).__name__ == "Linear4bit" and torch.is_autocast_enabled()
    return p, getattr(module, "cast_input_dtype_enabled", True) and not skipped


def _parts(module) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, float, tuple[float, bool]]:
    return (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, module.get_base_layer(),
            module.scaling[ADAPTER], _dropout(module))


def _linear_forward(self, x, *args, **kwargs):
    if args or kwargs or not _plain(self):
        return self._peft_forward(x, *args, **kwargs)
    a, b, base, scaling, drop = _parts(self)
    return LoraLinear.apply(x, a, b, base, scaling, drop)


def _mlp_forward(self, x, *args, **kwargs):
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    if args or kwargs or not all(_plain(p) for p in projections):
        return self._plain_forward(x, *args, **kwargs)
    (ga, gb, gbase, gs, g_drop), (ua, ub, ubase, us, u_drop), (da, db, dbase, ds, d_drop) = (
        _parts(p) for p in projections)
    return LoraSwiGLU.apply(x, ga, gb, ua, ub, da, db, (gbase, ubase, dbase), (gs, us, ds), (g_drop, u_drop, d_drop))


def swiglu(module: torch.nn.Module) -> bool:
    """A Llama-style MLP: gate, up and down projections and SiLU between them."""
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in SILU)


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Route the PEFT model's plain adapted projections, and its SwiGLU MLPs whose three
    projections are, through the kernels. Returns how many of each (a layer that is not plain
    keeps PEFT's forward: `steps.plan.compat` refuses such a model's cells before they run). Applied again
    (after Liger Kernel has patched the MLPs), it routes the MLPs once more and nothing twice."""
    counts = {"mlp": 0, "linear": 0}
    for module in model.modules():
        if swiglu(module) and all(_plain(getattr(module, n)) for n in ("gate_proj", "up_proj", "down_proj")):
            if getattr(module.forward, "__func__", None) is not _mlp_forward:
                module._plain_forward = module.forward
                module.forward = types.MethodType(_mlp_forward, module)
            counts["mlp"] += 1
    for module in model.modules():
        if _plain(module):
            if getattr(module.forward, "__func__", None) is not _linear_forward:
                module._peft_forward = module.forward
                module.forward = types.MethodType(_linear_forward, module)
            counts["linear"] += 1
    return counts


def not_plain(model: torch.nn.Module) -> dict[str, str]:
    """Adapted layers that are not a bias-free torch.nn.Linear (what the kernels compute), by last
    name: {"c_attn": "Conv1D with a bias", "q_proj": "Linear with a bias"}. The model's facts
    report them before a cell runs (`steps.trainer.facts`); the trainer asks again as it routes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    odd = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        base = module.get_base_layer()
        kind = type(base).__name__ if not isinstance(base, torch.nn.Linear) else ""
        bias = " with a bias" if getattr(base, "bias", None) is not None else ""
        if kind or bias:
            odd[name.rsplit(".", 1)[-1]] = f"{kind or 'Linear'}{bias}"
    return dict(sorted(odd.items()))
