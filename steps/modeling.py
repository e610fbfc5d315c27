"""Model, tokenizer and adapters for a cell: a preset built with random weights, or any
Hugging Face causal LM by hub id or local directory."""

from __future__ import annotations

from pathlib import Path

import torch

from steps import catalog
from steps.schema import CellSpec
from steps.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

DTYPES = {"fp32": torch.float32, "fp16-mixed": torch.float32, "bf16-mixed": torch.float32,
          "bf16-true": torch.bfloat16}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(cell: CellSpec) -> Tokenizer:
    """The model directory's tokenizer when it has one, otherwise the built-in byte tokenizer."""
    preset = catalog.model_presets().get(cell.model)
    source = (None if preset.tokenizer == "byte" else preset.tokenizer) if preset else cell.model
    if source is None or (
        Path(source).is_dir() and not any(Path(source, f).exists() for f in TOKENIZER_FILES)
    ):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(source, trust_remote_code=False))


def load_model(cell: CellSpec, vocab_size: int) -> torch.nn.Module:
    """Random init is seeded, so every rank builds the same weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[cell.precision]
    preset = catalog.model_presets().get(cell.model)
    if preset and preset.init == "random":
        config = AutoConfig.for_model(**{"vocab_size": vocab_size, **preset.config})
        torch.manual_seed(cell.train.seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    source = preset.source if preset else cell.model
    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)


def apply_peft(model: torch.nn.Module, cell: CellSpec) -> torch.nn.Module:
    if cell.peft == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = cell.train.lora
    torch.manual_seed(cell.train.seed + 1)  # adapter init is the same on every rank
    return get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM",
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            use_dora=cell.peft == "dora",
        ),
    )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
