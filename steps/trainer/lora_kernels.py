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

The maths is PEFT's (`y = x W^T + (x A^T) B^T * scaling`, dropout 0, no bias): losses and every
gradient equal PEFT's within 1e-5 relative in fp32 (`tests/test_lora_kernels.py`). Autocast is
kept: backward runs under the forward's autocast state. Where a module is not the plain case
(DoRA, dropout, a bias, merged or disabled adapters, several adapters) its own forward runs.
The modules must be whole when they run: the kernels read `lora_A.weight` and friends without
calling those modules, so ZeRO-3 (which gathers a module's weights as it is called) and tensor
parallelism (which splits them) are refused (`steps.plan.compat.lora_kernels`).
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


def _lora(x, base, a, b, scaling):
    """PEFT's forward, op for op: the frozen matmul; x cast to A's dtype, (x A^T) B^T * scaling
    added; the sum in the frozen matmul's dtype."""
    out = _frozen(x, base)
    return (out + F.linear(F.linear(_as_adapter(x, a), a), b) * scaling).to(out.dtype)


def _matmul_2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _lora_backward(grad, x, base, a, b, scaling, need_x: bool):
    """(dx, dA, dB) of `_lora` at `x`, recomputing x A^T (r columns) and, for a 4-bit weight,
    its dequantization."""
    x2, g2 = _matmul_2d(_as_adapter(x, a)), _matmul_2d(grad)
    xa = F.linear(x2, a)
    g_lora = g2.to(xa.dtype) * scaling
    d_b = g_lora.t() @ xa if b.requires_grad else None
    g_xa = g_lora @ b.to(g_lora.dtype)
    d_a = g_xa.t() @ x2.to(g_xa.dtype) if a.requires_grad else None
    d_x = None
    if need_x:
        dtype = _compute_dtype(base, x) if _quantized(base) else base.weight.dtype
        d_x = (g2.to(dtype) @ frozen_weight(base, dtype)).to(x.dtype)
        d_x = (d_x + (g_xa @ a.to(g_xa.dtype)).to(x.dtype)).reshape(x.shape)
    return d_x, d_a, d_b


class LoraLinear(torch.autograd.Function):
    """y = x W^T + (x A^T) B^T * scaling, keeping x only."""

    @staticmethod
    def forward(ctx, x, a, b, base, scaling):
        ctx.base, ctx.scaling, ctx.autocast = base, scaling, _Autocast(x)
        ctx.save_for_backward(x, a, b)
        return _lora(x, base, a, b, scaling)

    @staticmethod
    def backward(ctx, grad):
        x, a, b = ctx.saved_tensors
        with ctx.autocast():
            d_x, d_a, d_b = _lora_backward(grad, x, ctx.base, a, b, ctx.scaling, ctx.needs_input_grad[0])
        return d_x, d_a, d_b, None, None


# ---------------------------------------------------------------- a SwiGLU MLP, all three adapted
class LoraSwiGLU(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)), each projection LoRA-adapted; keeps x, gate(x) and up(x)."""

    @staticmethod
    def forward(ctx, x, ga, gb, ua, ub, da, db, bases, scalings):
        ctx.bases, ctx.scalings, ctx.autocast = bases, scalings, _Autocast(x)
        (gate_base, up_base, down_base), (gs, us, ds) = bases, scalings
        gate = _lora(x, gate_base, ga, gb, gs)
        up = _lora(x, up_base, ua, ub, us)
        ctx.save_for_backward(x, gate, up, ga, gb, ua, ub, da, db)
        return _lora(F.silu(gate) * up, down_base, da, db, ds)

    @staticmethod
    def backward(ctx, grad):
        x, gate, up, ga, gb, ua, ub, da, db = ctx.saved_tensors
        (gate_base, up_base, down_base), (gs, us, ds) = ctx.bases, ctx.scalings
        with ctx.autocast():
            silu = F.silu(gate)
            hidden = silu * up  # recomputed, not kept: the same ops as forward, the same values
            d_hidden, d_da, d_db = _lora_backward(grad, hidden, down_base, da, db, ds, True)
            d_up = d_hidden * silu
            d_gate = torch.ops.aten.silu_backward(d_hidden * up, gate)  # autograd's own SiLU backward
            dx_g, d_ga, d_gb = _lora_backward(d_gate, x, gate_base, ga, gb, gs, ctx.needs_input_grad[0])
            dx_u, d_ua, d_ub = _lora_backward(d_up, x, up_base, ua, ub, us, ctx.needs_input_grad[0])
        d_x = dx_g + dx_u if ctx.needs_input_grad[0] else None
        return d_x, d_ga, d_gb, d_ua, d_ub, d_da, d_db, None, None


# ---------------------------------------------------------------- patching a PEFT model
def _adapted(module: torch.nn.Module) -> bool:
    """A PEFT LoRA layer over a linear layer: `lora.Linear`, or QLoRA's `Linear4bit`."""
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and type(module).__name__ in ("Linear", "Linear4bit")


def _plain(module: torch.nn.Module) -> bool:
    """A PEFT LoRA Linear in the case the kernels compute: one active adapter, plain LoRA (no
    DoRA), no dropout, no bias, not merged or disabled."""
    if not _adapted(module) or module.disable_adapters or module.merged:
        return False
    if list(module.active_adapters) != [ADAPTER] or ADAPTER not in module.lora_A:
        return False
    if ADAPTER in getattr(module, "lora_variant", {}) or module.use_dora.get(ADAPTER, False):
        return False
    if not isinstance(module.lora_dropout[ADAPTER], torch.nn.Identity):
        return False
    base = module.get_base_layer()
    if not isinstance(base, torch.nn.Linear) or module.fan_in_fan_out:  # GPT-2's Conv1D: W transposed
        return False
    return base.bias is None and module.lora_A[ADAPTER].bias is None and module.lora_B[ADAPTER].bias is None


def _parts(module) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, float]:
    return (module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight, module.get_base_layer(),
            module.scaling[ADAPTER])


def _linear_forward(self, x, *args, **kwargs):
    if args or kwargs or not _plain(self):
        return self._peft_forward(x, *args, **kwargs)
    a, b, base, scaling = _parts(self)
    return LoraLinear.apply(x, a, b, base, scaling)


def _mlp_forward(self, x, *args, **kwargs):
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    if args or kwargs or not all(_plain(p) for p in projections):
        return self._plain_forward(x, *args, **kwargs)
    (ga, gb, gbase, gs), (ua, ub, ubase, us), (da, db, dbase, ds) = (_parts(p) for p in projections)
    return LoraSwiGLU.apply(x, ga, gb, ua, ub, da, db, (gbase, ubase, dbase), (gs, us, ds))


def swiglu(module: torch.nn.Module) -> bool:
    """A Llama-style MLP: gate, up and down projections and SiLU between them."""
    act = getattr(module, "act_fn", None)
    return (all(hasattr(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
            and type(act).__name__ in SILU)


def apply(model: torch.nn.Module) -> dict[str, int]:
    """Route the PEFT model's plain adapted projections, and its SwiGLU MLPs whose three
    projections are, through the kernels. Returns how many of each (a layer that is not plain
    keeps PEFT's forward: `steps.plan.compat` refuses such cells before they run). Applied again
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
