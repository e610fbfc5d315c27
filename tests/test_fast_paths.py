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
    ({"train": {"fused_optimizer": "on", "optimizer": "paged_adamw_8bit"}},
     "train.fused_optimizer: on is PyTorch's fused AdamW/SGD; paged_adamw_8bit is bitsandbytes' own kernel"),
])
def test_a_fast_path_is_refused_where_it_cannot_run(overrides, reason):
    assert compat.refusal(make_cell(**overrides)) == reason


def test_fast_paths_run_where_they_can():
    for overrides in ({"strategy": "fsdp", "gpus": 2, "train": {"compile": "layers"}},
                      {"strategy": "ddp", "gpus": 2, "train": {"compile": "model", "fused_optimizer": "on"}},
                      {"instance": "p4d.24xlarge", "train": {"liger": True}}):
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
