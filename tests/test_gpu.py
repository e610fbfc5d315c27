"""GPU checks (CI has no GPU and deselects them: `-m "not gpu"`).

A TinyLlama-1.1B-shaped model with random weights, bf16, sequence 2048, one GPU: full, LoRA and
QLoRA all train, and QLoRA needs less memory than LoRA, which needs less than full fine-tuning.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_cell, torchrun_trainer

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tinyllama_shape_full_lora_qlora_on_one_gpu(tmp_path):
    peaks = {}
    for peft in ("full", "lora", "qlora"):
        cell = make_cell(model="tinyllama-1.1b", peft=peft, precision="bf16-true" if peft == "full" else "bf16-mixed",
                         micro_batch=1, seq_len=2048,
                         train={"init": "random", "max_steps": 6, "timing_warmup_steps": 2,
                                "gradient_checkpointing": True, "save_adapter": False},
                         data={"task": "synthetic-reverse", "packing": True, "train_samples": 64, "val_samples": 2})
        proc, m = torchrun_trainer(cell, tmp_path / peft, timeout=900)
        assert m["outcome"] == "ok", m["error"]
        assert m["device"].startswith(("NVIDIA", "Tesla")) and m["tokens_per_s"] > 0
        peaks[peft] = m["peak_mem_gb"]
    assert peaks["qlora"] < peaks["lora"] < peaks["full"]
