"""`train.lora_kernels` against PEFT: the debug Llama built by the trainer's own modeling code,
once with PEFT's modules as they are and once routed through the kernels, one forward and
backward on the same tokens. In fp32 the loss and every adapter gradient equal PEFT's within
1e-5 relative (the largest difference over the largest value, per tensor); under bf16 autocast,
where the two round in different places, within the stated bf16 tolerance."""

from __future__ import annotations

import pytest
import torch

from steps.plan import catalog, compat
from steps.trainer import lora_kernels, modeling
from steps.trainer.engines.base import autocast, token_loss_sum
from tests.conftest import make_cell

ARCH = catalog.model_presets()["llama-debug"].config
EVERY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = 1e-5
BF16 = 2e-2  # bf16 sums the gradient of a shared input in another order (measured: 1.15% at worst)


def _cell(peft="lora", precision="fp32", targets=EVERY, **train):
    return make_cell(peft=peft, precision=precision, micro_batch=2, seq_len=48,
                     train={"init": "random", "lora": {"r": 8, "alpha": 16, "target_modules": targets}, **train})


def _run(cell, kernels: bool):
    """Loss and adapter gradients of one forward and backward; the kernels' counts."""
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    with torch.no_grad():  # PEFT starts lora_B at zero, where lora_A's gradient and x's through B are zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    counts = lora_kernels.apply(model) if kernels else None
    model.train()
    ids = torch.randint(0, ARCH["vocab_size"], (cell.micro_batch, cell.seq_len), generator=torch.Generator().manual_seed(0))
    with autocast(cell, torch.device("cpu")):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = token_loss_sum(logits, ids) / ids.numel()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, counts


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    errors = {n: ((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)).item() for n in a}
    name = max(errors, key=errors.get)
    return name, errors[name]


@pytest.mark.parametrize(("peft", "precision", "tolerance"), [
    ("lora", "fp32", FP32), ("qlora", "fp32", FP32), ("lora", "bf16-mixed", BF16), ("qlora", "bf16-mixed", BF16),
    ("lora", "bf16-true", BF16)])
def test_losses_and_every_gradient_are_peft_s(peft, precision, tolerance):
    cell = _cell(peft, precision)
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    layers = ARCH["num_hidden_layers"]
    assert counts == {"mlp": layers, "linear": len(EVERY) * layers}
    assert sorted(fast_grads) == sorted(grads) and len(grads) == 2 * len(EVERY) * layers
    assert abs(fast_loss - loss) / loss <= tolerance, (fast_loss, loss)
    name, worst = _worst(grads, fast_grads)
    assert worst <= tolerance, f"{name}: {worst:.2e}"


def test_only_the_attention_adapted_runs_each_projection_through_its_kernel():
    cell = _cell(targets=["q_proj", "v_proj"])
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    assert counts == {"mlp": 0, "linear": 2 * ARCH["num_hidden_layers"]}
    assert abs(fast_loss - loss) / loss <= FP32
    assert _worst(grads, fast_grads)[1] <= FP32


def test_the_trainer_routes_a_cell_with_lora_kernels_through_them():
    cell = _cell(lora_kernels=True)
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.forward.__func__ is lora_kernels._mlp_forward
    assert mlp.gate_proj.forward.__func__ is lora_kernels._linear_forward


@pytest.mark.parametrize(("settings", "reason"), [
    ({"peft": "dora"}, "train.lora_kernels computes LoRA's own maths; dora is not plain LoRA: use lora or qlora"),
    ({"train": {"lora": {"dropout": 0.1}}}, "train.lora_kernels: the kernels have no dropout "
                                            "(train.lora.dropout=0.1); use dropout 0, or lora_kernels: false"),
    ({"strategy": "tensor", "gpus": 2}, "train.lora_kernels with tensor parallelism (tensor): the plan splits the "
                                        "adapted projections across ranks; use pipeline, ddp or fsdp, or "
                                        "lora_kernels: false"),
    ({"strategy": "zero3", "gpus": 2}, "train.lora_kernels with zero3: ZeRO-3 gathers a module's weights as the "
                                       "module is called, and the kernels read them without calling it; use zero2 "
                                       "or fsdp, or lora_kernels: false"),
    ({"train": {"compile": "layers"}}, "train.lora_kernels with train.compile: compile traces PEFT's own ops; use "
                                       "one of the two"),
    ({"strategy": "hybrid", "gpus": 4, "train": {"parallel": {"hybrid_inner": "tensor", "model_parallel": 2}}},
     "train.lora_kernels with tensor parallelism (hybrid): the plan splits the adapted projections across ranks; "
     "use pipeline, ddp or fsdp, or lora_kernels: false"),
    ({"strategy": "zero3_offload", "gpus": 2}, "train.lora_kernels with zero3_offload: ZeRO-3 gathers a module's "
                                               "weights as the module is called, and the kernels read them without "
                                               "calling it; use zero2 or fsdp, or lora_kernels: false"),
])
def test_what_the_kernels_cannot_compute_is_refused_with_the_reason(settings, reason):
    train = {"lora_kernels": True, **settings.pop("train", {})}
    assert compat.refusal(make_cell(**settings, train=train)) == reason


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero1", "zero2", "pipeline", "hybrid"])
def test_the_kernels_run_under_every_strategy_that_keeps_modules_whole(strategy):
    cell = make_cell(strategy=strategy, gpus=4 if strategy == "hybrid" else 2, train={"lora_kernels": True})
    assert compat.refusal(cell) is None


def test_applying_again_routes_nothing_twice():
    """As after Liger Kernel patched the MLPs: an MLP whose forward was replaced is routed again,
    and no layer wraps the kernels' own forward."""
    cell = _cell()
    loss, grads, counts = _run(cell, kernels=True)
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    first = lora_kernels.apply(model)
    mlp = model.base_model.model.model.layers[0].mlp
    mlp.forward = mlp._plain_forward  # what Liger's patch does: the MLP's own forward back in place
    assert lora_kernels.apply(model) == first == counts
    assert mlp.forward.__func__ is lora_kernels._mlp_forward
    assert mlp.gate_proj._peft_forward.__func__ is not lora_kernels._linear_forward


def test_under_activation_checkpointing_the_gradients_are_peft_s():
    """Checkpointing runs each layer's forward again in backward: the kernels' functions too."""
    cell = _cell(gradient_checkpointing=True)
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    assert counts == {"mlp": ARCH["num_hidden_layers"], "linear": len(EVERY) * ARCH["num_hidden_layers"]}
    assert abs(fast_loss - loss) / loss <= FP32
    assert _worst(grads, fast_grads)[1] <= FP32
