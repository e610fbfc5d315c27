"""Trainer features for real: out-of-memory as a result, checkpoints and --resume, adapters in
PEFT's format, a model and tokenizer loaded from a local directory, goodput metrics, precisions
and memory savers. The cells that need no launch of their own (no memory cap, no kill) share one
torchrun launch per world size (`OneLaunchPerWorldSize`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import REPO, OneLaunchPerWorldSize, make_cell, torchrun_trainer

pytestmark = pytest.mark.slow

RESUMED = [("ddp", 2, 2, 1), ("zero2", 2, 2, 1), ("pipeline", 2, 2, 2)]
ADAPTERS = {"single": dict(gpus=1, micro_batch=4), "pipeline": dict(gpus=2, micro_batch=2, grad_accum=2)}
FP32_LORA_6_STEPS = [5.426603, 5.409957, 5.398178, 5.422245, 5.404377, 5.364533]  # PEFT's default llama targets
PRECISIONS = {  # what a variant changes, and how close its losses stay to the fp32 run's
    "grad-checkpointing": ({"train": {"gradient_checkpointing": True}}, 1e-5),  # recomputation changes no number
    "paged-adamw-8bit": ({"train": {"optimizer": "paged_adamw_8bit"}}, 1e-5),  # small tensors keep 32-bit state
    "fp16-mixed": ({"precision": "fp16-mixed"}, 1e-3),
    "bf16-mixed": ({"precision": "bf16-mixed"}, 3e-3),
    "bf16-true": ({"precision": "bf16-true"}, 3e-3),
}


@pytest.mark.parametrize("strategy,gpus", [("single", 1), ("ddp", 2)])
def test_out_of_memory_is_a_result_not_a_traceback(tmp_path, strategy, gpus):
    """A 2 GB cap per rank and a batch that needs more: outcome oom, the trainer's exit code 3."""
    cell = make_cell(strategy=strategy, gpus=gpus, micro_batch=256, seq_len=512,
                     train={"max_steps": 2, "memory_cap_gb": 2.0},
                     data={"task": "synthetic-reverse", "train_samples": 512, "val_samples": 8})
    proc, m = torchrun_trainer(cell, tmp_path)
    assert m["outcome"] == "oom"
    assert "can't allocate memory" in m["error"]
    assert "exitcode  : 3" in proc.stderr  # torchrun's summary names the trainer's exit code
    assert 1.5 < m["peak_mem_gb"] <= 2.0 + 0.05
    assert m["loss_curve"] == [] and m["trainable_params"] > 0


def _resumable(strategy: str, gpus: int, micro_batch: int, grad_accum: int = 1) -> dict:
    return dict(strategy=strategy, gpus=gpus, micro_batch=micro_batch, grad_accum=grad_accum,
                train={"max_steps": 6, "checkpoint_every": 3, "timing_warmup_steps": 1})


def _local_model(folder: Path):
    """A Llama folder as `save_pretrained` writes it, with its own 31-token tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *"abcdefghijklmnopqrstuvwxyz=", " "])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(folder)
    config = AutoConfig.for_model("llama", vocab_size=len(vocab), hidden_size=64, intermediate_size=192,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return config


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("my-model")
    return folder, _local_model(folder)


@pytest.fixture(scope="module")
def launched(tmp_path_factory, local_model):
    cells = {f"uninterrupted-{r[0]}": make_cell(**_resumable(*r)) for r in RESUMED}
    cells |= {f"adapter-{strategy}": make_cell(strategy=strategy, **shape) for strategy, shape in ADAPTERS.items()}
    cells["local-model"] = make_cell(model=str(local_model[0]), strategy="ddp", gpus=2, micro_batch=2)
    cells["goodput"] = make_cell(lr=3e-3, train={"max_steps": 40, "eval_every": 10, "target_loss": 4.5,
                                                 "lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]}})
    for name, (settings, _) in PRECISIONS.items():
        cells[f"precision-{name}"] = make_cell(**{**settings, "train": {"max_steps": 6, **settings.get("train", {})}})
    return OneLaunchPerWorldSize(tmp_path_factory.mktemp("features"), cells)


def _resume(launched, tmp_path, strategy: str, gpus: int, micro_batch: int, grad_accum: int = 1):
    base = _resumable(strategy, gpus, micro_batch, grad_accum)
    _, full, _ = launched(f"uninterrupted-{strategy}")
    # Killed (SIGKILL, no clean-up) while running step 5, after the checkpoint of step 3.
    cut_out = tmp_path / "killed"
    killed = make_cell(**{**base, "train": {**base["train"], "fault": {"kind": "kill", "at_step": 5}}})
    proc, m = torchrun_trainer(killed, cut_out)
    assert proc.returncode != 0 and m["outcome"] == "error"
    assert sorted(p.name for p in (cut_out / "checkpoints").iterdir()) == ["step_0000003"]
    (cut_out / "cell.yaml").write_text(yaml.safe_dump(make_cell(**base).model_dump(mode="json")))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
           "-m", "steps.train", "--cell", str(cut_out / "cell.yaml"), "--out", str(cut_out), "--resume"]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    resumed = json.loads((cut_out / "metrics.json").read_text())
    assert proc.returncode == 0, resumed.get("error")
    assert resumed["outcome"] == "ok" and resumed["resumed_from_step"] == 3
    full_losses = [p["loss"] for p in full["loss_curve"]]
    resumed_losses = [p["loss"] for p in resumed["loss_curve"]]
    assert [p["step"] for p in resumed["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert resumed_losses[3:] == pytest.approx(full_losses[3:], rel=1e-6)
    assert resumed["val_loss"] == pytest.approx(full["val_loss"], rel=1e-6)


@pytest.mark.parametrize("strategy,gpus,mb,ga", RESUMED)
def test_killed_run_resumed_from_its_checkpoint_reproduces_the_uninterrupted_losses(
        launched, tmp_path, strategy, gpus, mb, ga):
    _resume(launched, tmp_path, strategy, gpus, mb, ga)


@pytest.mark.parametrize("strategy", list(ADAPTERS))
def test_adapter_is_saved_in_peft_format_and_reloads(launched, strategy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steps.trainer import modeling

    cell = launched.cells[f"adapter-{strategy}"]
    _, m, out = launched(f"adapter-{strategy}")
    assert m["outcome"] == "ok", m["error"]
    adapter = out / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    base = AutoModelForCausalLM.from_pretrained(modeling.random_checkpoint(cell, 259))
    model = PeftModel.from_pretrained(base, adapter)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    # PEFT's default targets for llama (q_proj, v_proj) in both layers, trained (not the zero init).
    assert m["lora_targets"] == ["q_proj", "v_proj"]
    assert sorted(re.search(r"layers\.\d\.self_attn\.\w+(?=\.lora_B)", n).group() for n in lora_b) == [
        f"layers.{i}.self_attn.{proj}" for i in (0, 1) for proj in ("q_proj", "v_proj")]
    assert all(p.abs().sum() > 0 for p in lora_b.values())
    # The reloaded adapter reproduces the trained model's validation loss.
    from steps.trainer import data
    from steps.trainer.tokenizer import ByteTokenizer

    splits = data.build_splits(cell.data, ByteTokenizer(), cell.seq_len)
    batch = data.collate(splits.val, ByteTokenizer.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert loss.item() == pytest.approx(m["val_loss"], rel=1e-4)


def test_model_and_tokenizer_from_a_local_directory(launched, local_model):
    """`from_pretrained` on a directory (the path a hub download takes), with its own tokenizer."""
    from transformers import AutoModelForCausalLM

    _, config = local_model
    _, m, _ = launched("local-model")
    assert m["outcome"] == "ok", m["error"]
    base = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert m["total_params"] - m["trainable_params"] == base
    # The directory's 31-token vocabulary, not the built-in byte tokenizer's 259: the loss
    # starts near ln(31).
    assert m["loss_curve"][0]["loss"] == pytest.approx(3.43, abs=0.3)


def test_goodput_and_epoch_metrics(launched):
    _, m, _ = launched("goodput")
    assert m["outcome"] == "ok", m["error"]
    assert [v["step"] for v in m["val_curve"]] == [10, 20, 30, 40, 40]
    first = next(v for v in m["val_curve"] if v["val_loss"] <= 4.5)
    assert m["steps_to_target"] == first["step"] and m["time_to_target_s"] == first["time_s"]
    assert m["tokens_to_target"] == sum(p["tokens"] for p in m["loss_curve"][: first["step"]])
    assert m["steps_per_epoch"] == 256 // 4 and m["epochs"] == pytest.approx(40 / 64)
    assert m["epoch_s"] == pytest.approx(m["step_s"] * 64)
    assert m["train_s"] < m["trainer_wall_s"]
    assert m["flops_per_token"] > 0 and m["mfu"] is None  # local-cpu has no published peak


@pytest.mark.parametrize("variant", list(PRECISIONS))
def test_precisions_and_memory_savers_track_the_fp32_run(launched, variant):
    _, m, _ = launched(f"precision-{variant}")
    assert m["outcome"] == "ok", m["error"]
    assert [p["loss"] for p in m["loss_curve"]] == pytest.approx(FP32_LORA_6_STEPS, rel=PRECISIONS[variant][1])
