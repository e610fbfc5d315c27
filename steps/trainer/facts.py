"""What the planner must know about a model before anything launches, read from the model
itself: its configuration, and the model built on the meta device (no weights, no memory, a
second or so even for 70B) with the cell's adapter applied by PEFT.

    python -m steps.trainer.facts CELLS.json FACTS.json   # {"models": {...}, "machine": {...}}

CELLS.json is a list of cells (one per distinct model and adapter setting is enough). The
planner (`steps.plan.preflight`) turns these facts into problems and refusals; this module
only measures, so that planning itself never imports torch.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from steps.plan import catalog
from steps.plan.compat import adapter_key
from steps.plan.preflight import FILE_TASKS, data_key
from steps.plan.schema import CellSpec
from steps.trainer import lora_kernels, modeling

HUB_TIMEOUT_S = 10.0
OFFLINE_HINT = ("download it once where the Hub is reachable (`hf download {name}`) and set "
                "HF_HUB_OFFLINE=1, or name a local folder")


def _config(cell: CellSpec):
    """The model's configuration: a preset's, a local folder's, or the Hub's. Every Hub id the
    cell will load from (weights, tokenizer) is asked once, with a short timeout, before
    transformers would retry for minutes."""
    for name in _hub_ids(cell):
        _reach_hub(name)
    return modeling.model_config(cell, modeling.load_tokenizer(cell).vocab_size)


def _hub_ids(cell: CellSpec) -> list[str]:
    preset = catalog.model_presets().get(cell.model)
    if preset is None:
        wanted = [cell.model]
    else:
        wanted = [None if modeling.is_random_init(cell) else preset.source,
                  None if "byte" in (preset.tokenizer, cell.train.tokenizer) else preset.tokenizer]
    return [name for name in dict.fromkeys(wanted) if name and not os.path.isdir(name)]


def _reach_hub(name: str) -> None:
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import HfHubHTTPError

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return  # in the local cache: loads without the network
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LookupError("not in the local Hugging Face cache and HF_HUB_OFFLINE=1; " + OFFLINE_HINT.format(name=name))
    try:
        HfApi().model_info(name, timeout=HUB_TIMEOUT_S)
    except HfHubHTTPError as exc:
        raise LookupError(f"the Hugging Face Hub has no model {name!r} you can read ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - DNS, refused connection, timeout, proxy
        raise LookupError(f"the Hugging Face Hub cannot be reached ({type(exc).__name__}); "
                          + OFFLINE_HINT.format(name=name)) from None


def _meta_model(config, cell: CellSpec):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cell.train.trust_remote_code)


def _linear_names(model) -> list[str]:
    """The last part of the name of every linear layer (what a target_modules list names)."""
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, (torch.nn.Linear, Conv1D))})


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def _pipeline_split(model) -> str | None:
    """Why the pipeline cannot cut this model into stages; None when it can."""
    from steps.trainer import split

    try:
        split.anatomy(model)
    except ValueError as exc:
        return str(exc)
    return None


def _unquantizable(model) -> dict[str, str]:
    """Linear layers bitsandbytes would leave in full precision: transformers quantizes modules
    whose type is exactly torch.nn.Linear (or GPT-2's Conv1D), not subclasses (Falcon's
    FalconLinear), and keeps the output embedding whole."""
    head = model.get_output_embeddings()
    return {name.rsplit(".", 1)[-1]: type(m).__name__ for name, m in sorted(model.named_modules())
            if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear and m is not head}


def context_length(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def adapter_facts(cell: CellSpec, config) -> dict[str, Any]:
    """PEFT's own result for the cell's adapter on this model: what it targets and how many
    parameters it trains, or PEFT's refusal."""
    model = _meta_model(config, cell)
    if cell.peft == "full":
        return {"trainable_params": sum(p.numel() for p in model.parameters())}
    from peft import LoraConfig, get_peft_model

    lora = cell.train.lora
    targets = modeling.lora_targets(cell, config.model_type)
    if isinstance(targets, list):  # PEFT only objects when no name matches: check each
        names = [n for n, _ in model.named_modules()]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if unmatched:
            return {"error": f"{', '.join(unmatched)} match(es) no module of the model", "targets": targets}
    try:
        model = get_peft_model(model, LoraConfig(
            task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, target_modules=targets,
            use_dora=cell.peft == "dora"))
    except ValueError as exc:
        return {"error": str(exc).splitlines()[0], "targets": targets}
    trainable, _ = model.get_nb_trainable_parameters()
    targeted = sorted({n.rsplit(".", 1)[-1] for n in model.base_model.targeted_module_names})
    return {"trainable_params": trainable, "targets": targets, "targeted": targeted,
            "not_plain": lora_kernels.not_plain(model)}


def model_facts(cells: list[CellSpec]) -> dict[str, Any]:
    """Facts per model name, with the adapter facts of each distinct adapter setting."""
    out: dict[str, Any] = {}
    for cell in cells:
        entry = out.get(cell.model)
        if entry is None:
            entry = out[cell.model] = _one_model(cell)
        if "error" in entry:
            continue
        key = adapter_key(cell)
        if key not in entry["adapters"]:
            entry["adapters"][key] = adapter_facts(cell, entry["_config"])
    for entry in out.values():
        entry.pop("_config", None)
    return out


ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def _one_model(cell: CellSpec) -> dict[str, Any]:
    try:
        config = _config(cell)
    except Exception as exc:  # noqa: BLE001 - every way a model cannot be found is a fact
        return {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, LookupError) else str(exc)}
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not cell.train.trust_remote_code:
        return {"error": f"model type {config.model_type!r} is not a causal language model transformers knows"}
    if problem := _not_causal_checkpoint(config) or _missing_weights(cell):
        return {"error": problem}
    model = _meta_model(config, cell)
    tp_plan = getattr(config, "base_model_tp_plan", None) or {}
    return {
        "model_type": config.model_type,
        "class": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "attention_heads": getattr(config, "num_attention_heads", None),
        "kv_heads": getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None),
        "context": context_length(config),
        "tied_embeddings": _tied(model),
        "tensor_plan": bool(tp_plan),
        # How the plan shards each layer, by its last name (what adapter targets name).
        "tensor_styles": {k.rsplit(".", 1)[-1]: v for k, v in tp_plan.items()},
        "pipeline_split": _pipeline_split(model),
        "attention": [impl for impl, flag in (("sdpa", "_supports_sdpa"), ("flash_attention_2", "_supports_flash_attn"),
                                              ("flex_attention", "_supports_flex_attn")) if getattr(model, flag, False)]
                     + ["eager"],
        "linear_names": _linear_names(model),
        "unquantizable": _unquantizable(model),
        # What the planner predicts memory and time from (steps.estimate.planner).
        "total_params": sum(p.numel() for p in model.parameters()),
        "arch": {key: getattr(config, key, None) for key in ARCH_KEYS},
        "adapters": {},
        "_config": config,
    }


CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")  # transformers' names of causal-LM classes
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _not_causal_checkpoint(config) -> str | None:
    """A folder saved from another head (`architectures` in its config.json: a classifier, a
    masked LM) loads into a causal LM with its head drawn at random, or not at all."""
    saved = getattr(config, "architectures", None) or []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not saved or any(a in causal or a.endswith(CAUSAL_HEADS) for a in saved):
        return None
    return (f"its config.json was saved from {', '.join(saved)}, not a causal language model; fine-tuning here "
            f"trains a causal LM (its *ForCausalLM head): use a causal-LM checkpoint of {config.model_type}")


def _missing_weights(cell: CellSpec) -> str | None:
    """A local folder with a config but no weights, where the cell loads pretrained ones."""
    folder = cell.model if catalog.model_presets().get(cell.model) is None else None
    if folder is None or not os.path.isdir(folder) or modeling.is_random_init(cell):
        return None
    if any(os.path.exists(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return None
    return (f"{folder} has a config.json but no weights ({', '.join(WEIGHT_FILES)}) and train.init is "
            f"{cell.train.init!r} (pretrained); save the weights there, or set train.init: random to train "
            f"this architecture from random weights")


def data_facts(cells: list[CellSpec]) -> dict[str, Any]:
    """The rows each distinct dataset gives the trainer, by the trainer's own code (the split,
    seq_len's cuts, packing): {data_key: {"train": n, "val": n}} or {"error": ...}.
    Synthetic data unpacked is counted by the planner itself; Hub datasets when they load."""
    from steps.trainer import data

    out: dict[str, Any] = {}
    for cell in cells:
        key = data_key(cell)
        if key in out or (cell.data.task not in FILE_TASKS and not cell.data.packing) or not _readable(cell):
            continue
        try:
            splits = data.build_splits(cell.data, modeling.load_tokenizer(cell), cell.seq_len)
            out[key] = {"train": len(splits.train), "val": len(splits.val)}
        except Exception as exc:  # noqa: BLE001 - every way the data cannot be read is a fact
            out[key] = {"error": f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)}
    return out


def _readable(cell: CellSpec) -> bool:
    """Data whose file is there (a missing one is the planner's own problem to report)."""
    return cell.data.task not in FILE_TASKS or bool(cell.data.path and os.path.exists(cell.data.path))


def machine_facts() -> dict[str, Any]:
    """The accelerators this machine has (what `compute: local` can run on)."""
    if not torch.cuda.is_available():
        return {"gpus": []}
    return {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], encoding="utf-8") as fh:
        cells = [CellSpec.model_validate(c) for c in json.load(fh)]
    modeling.block_unused_imports(cells)
    facts = {"models": model_facts(cells), "data": data_facts(cells), "machine": machine_facts()}
    with open(argv[1], "w", encoding="utf-8") as fh:
        json.dump(facts, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
