"""The fast paths' settings: where each is refused (with the reason) before anything runs, and
the GPU measures' guards on a machine without a GPU. Their losses are checked by the strategy
tests (CPU) and tests/test_gpu.py (GPU)."""

from __future__ import annotations

import pytest
import torch

from steps.plan import compat
from steps.trainer import measure
from steps.trainer.engines.optim import build_optimizer, fused
from tests.conftest import make_cell


@pytest.mark.parametrize("overrides,reason", [
    ({"train": {"liger": True}},
     "train.liger: Liger Kernel's kernels are Triton GPU kernels and local-cpu is a CPU; use a GPU instance "
     "(local-gpu)"),
    ({"strategy": "zero3", "gpus": 2, "train": {"compile": "layers"}},
     "train.compile: layers with DeepSpeed (zero3): DeepSpeed wraps the module and compiles through its own "
     "engine; use fsdp for sharded training with compile"),
    ({"strategy": "pipeline", "gpus": 2, "grad_accum": 2, "train": {"compile": "layers"}},
     "train.compile: layers with pipeline: the stages and tensor-parallel layers are not compiled here; use ddp "
     "or fsdp with compile"),
    ({"strategy": "fsdp", "gpus": 2, "train": {"compile": "model"}},
     "train.compile: model with fsdp: FSDP2 units are the decoder layers; use compile: layers"),
    ({"peft": "qlora", "train": {"compile": "layers"}},
     "train.compile: bitsandbytes' 4-bit layers break torch.compile's graphs; use compile: off for qlora"),
    ({"strategy": "fsdp", "gpus": 2, "train": {"loss": "chunked"}},
     "train.loss: chunked reads the output head's weight after the forward pass; under fsdp it is split or "
     "sharded then; use single, ddp, zero1 or zero2, or loss: logits"),
    ({"strategy": "tensor", "gpus": 2, "train": {"loss": "chunked"}},
     "train.loss: chunked reads the output head's weight after the forward pass; under tensor it is split or "
     "sharded then; use single, ddp, zero1 or zero2, or loss: logits"),
    ({"strategy": "zero3_offload", "gpus": 2, "train": {"loss": "chunked"}},
     "train.loss: chunked reads the output head's weight after the forward pass; under zero3_offload it is split "
     "or sharded then; use single, ddp, zero1 or zero2, or loss: logits"),
    ({"train": {"loss": "chunked", "compile": "model"}},
     "train.loss: chunked taps the output head, which a compiled model has traced; use compile: layers"),
    ({"train": {"fused_optimizer": "on", "optimizer": "paged_adamw_8bit"}},
     "train.fused_optimizer: on is PyTorch's fused AdamW/SGD; paged_adamw_8bit is bitsandbytes' own kernel"),
])
def test_a_fast_path_is_refused_where_it_cannot_run(overrides, reason):
    assert compat.refusal(make_cell(**overrides)) == reason


def test_fast_paths_run_where_they_can():
    for overrides in ({"strategy": "fsdp", "gpus": 2, "train": {"compile": "layers"}},
                      {"strategy": "ddp", "gpus": 2, "train": {"compile": "model", "fused_optimizer": "on"}},
                      {"instance": "p4d.24xlarge", "train": {"liger": True}},
                      *({"strategy": s, "gpus": 2, "train": {"loss": "chunked"}} for s in ("ddp", "zero1", "zero2")),
                      {"train": {"loss": "chunked", "compile": "layers"}}):
        assert compat.refusal(make_cell(**overrides)) is None


def test_the_fused_optimizer_is_on_for_cuda_only_by_default():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert fused(make_cell(), cpu) is False
    assert fused(make_cell(train={"fused_optimizer": "on"}), cpu) is True
    assert build_optimizer(cpu, make_cell(train={"fused_optimizer": "on"})).defaults["fused"] is True
    assert build_optimizer(cpu, make_cell()).defaults["fused"] is None
    assert fused(make_cell(train={"optimizer": "sgd", "fused_optimizer": "on"}), cpu) is True


def test_gpu_measures_report_nothing_on_a_cpu():
    sampler = measure.GpuSampler(torch.device("cpu"))
    sampler.start()
    sampler.stop()
    assert sampler.mean_util_pct is None and sampler.max_used_gb is None
    measure.synchronize(torch.device("cpu"))  # a no-op, not an error


def test_the_chunked_loss_keeps_no_logits_and_gives_the_same_loss_and_gradients():
    """The loss and every gradient of one micro-batch equal the logits path's (fp32, rel 1e-5),
    while autograd keeps no tensor of b x s x V entries (the logits path keeps its fp32 log-softmax)."""
    from steps.trainer import modeling
    from steps.trainer.engines import chunked_loss
    from steps.trainer.engines.base import token_loss_sum

    cell = make_cell(peft="full", micro_batch=2, seq_len=40, train={"init": "random"})
    model = modeling.load_model(cell, 259, torch.device("cpu"))
    ids = torch.randint(0, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, 1)
    labels[:, -3:] = -100
    head = model.get_output_embeddings()
    shapes: list[tuple[int, ...]] = []

    def record(t):
        shapes.append(tuple(t.shape))
        return t

    results = []
    for loss_kind in ("logits", "chunked"):
        model.zero_grad()
        shapes.clear()
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            if loss_kind == "logits":
                loss = token_loss_sum(model(input_ids=ids, use_cache=False).logits, labels)
            else:
                with chunked_loss.tapped_head(head) as hidden:
                    assert model(input_ids=ids, use_cache=False).logits.numel() == 0
                loss = chunked_loss.chunked_loss_sum(hidden[0], head, labels, chunk=24)  # 4 chunks, one short
        logits_kept = any(len(s) and s[-1] == 259 and torch.Size(s).numel() >= 80 * 259 for s in shapes)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, logits_kept))
    (plain, plain_grads, plain_kept), (chunked, chunked_grads, chunked_kept) = results
    assert plain_kept and not chunked_kept
    assert chunked == pytest.approx(plain, rel=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert "forward" not in vars(head)  # the tap is gone
