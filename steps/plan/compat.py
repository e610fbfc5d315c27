"""Combinations that cannot run, refused before launch with the reason and what to run instead.

Each rule returns a reason or None. Keep this list short: refuse only what truly cannot work
(docs/compatibility.md lists them; tests/test_docs.py checks the README's method x strategy
grid against what expansion refuses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from steps.plan import catalog, lora_kernels
from steps.plan.schema import ALL_LINEAR, CellSpec


def _arch(cell: CellSpec) -> dict:
    preset = catalog.model_presets().get(cell.model)
    return preset.config if preset else {}  # hub models: checked when loaded


def quantized_tensor_parallel(cell: CellSpec) -> str | None:
    if cell.peft == "qlora" and cell.layout.model_split == "tensor":
        return ("qlora with tensor parallelism: bitsandbytes' packed 4-bit weights cannot be split "
                "across ranks; use qlora with pipeline, ddp, fsdp or zero2/zero3, or lora with tensor")
    return None


def dora_tensor_parallel(cell: CellSpec) -> str | None:
    if cell.peft == "dora" and cell.layout.model_split == "tensor":
        return ("dora with tensor parallelism: peft's DoRA magnitude does not support sharded "
                "weights; use lora with tensor, or dora with pipeline, ddp, fsdp or zero")
    return None


def adapter_on_sharded_head(cell: CellSpec) -> str | None:
    """transformers' tensor plan splits lm_head's output across ranks; a LoRA adapter on it
    produces the whole vocabulary and the two cannot be added (measured: 259 vs 129 on 2 ranks)."""
    targets = cell.train.lora.target_modules
    on_head = "lm_head" in targets if isinstance(targets, list) else (
        isinstance(targets, str) and targets != ALL_LINEAR and re.fullmatch(targets, "lm_head") is not None)
    if cell.peft in ("lora", "dora") and cell.layout.model_split == "tensor" and on_head:
        return ("lora on lm_head with tensor parallelism: the head is split across ranks and its "
                "adapter is not; drop lm_head from train.lora.target_modules, or use pipeline/ddp")
    return None


def hybrid_shape(cell: CellSpec) -> str | None:
    if cell.strategy != "hybrid":
        return None
    mp = cell.layout.mp_size
    if cell.world_size % mp or cell.world_size // mp < 2:
        return (f"hybrid needs at least 2 data-parallel groups of train.parallel.model_parallel={mp} "
                f"ranks, and world size {cell.world_size} gives {cell.world_size / mp:g}; use "
                f"gpus: {2 * mp} (or more, a multiple of {mp}), or strategy {cell.layout.model_split}")
    return None


def model_split_of_one(cell: CellSpec) -> str | None:
    """Tensor or pipeline parallelism over one rank splits nothing (tensor has no plan to run)."""
    if cell.strategy in ("tensor", "pipeline") and cell.layout.mp_size < 2:
        return (f"{cell.strategy} parallelism over {cell.layout.mp_size} rank splits nothing; use "
                f"gpus >= 2, or strategy single for one GPU")
    return None


def split_fits_model(cell: CellSpec) -> str | None:
    arch, inner = _arch(cell), cell.layout.model_split
    if not arch or inner is None:
        return None
    ways = cell.layout.mp_size
    if inner == "pipeline" and arch.get("num_hidden_layers", ways) < ways:
        return (f"pipeline over {ways} ranks needs at least {ways} layers, {cell.model} has "
                f"{arch['num_hidden_layers']}; use fewer ranks or ddp/fsdp")
    if inner == "tensor":
        heads, kv = arch.get("num_attention_heads", ways), arch.get("num_key_value_heads", ways)
        if heads % ways or kv % ways:
            return (f"tensor parallelism over {ways} ranks needs attention heads ({heads}) and "
                    f"key/value heads ({kv}) divisible by {ways}; use a divisor of {kv} ranks")
    return None


def precision_supported(cell: CellSpec) -> str | None:
    instance = catalog.instances().get(cell.instance)
    if instance and not instance.bf16 and cell.precision.startswith("bf16"):
        return (f"{cell.instance} ({instance.accelerator}) has no bf16; use precision fp16-mixed "
                f"(or fp32)")
    return None


def devices_fit(cell: CellSpec) -> str | None:
    """A node runs one process per GPU: more processes than the instance has GPUs cannot run."""
    instance = catalog.instances().get(cell.instance)
    if instance is None or instance.devices_per_node == 0 or cell.gpus <= instance.devices_per_node:
        return None
    if instance.local_gpu:  # the default matrix still runs its one-GPU cells on a one-GPU machine
        return (f"needs {cell.gpus} GPUs on this machine, which has {instance.devices_per_node} "
                f"({instance.accelerator})")
    family = cell.instance.split(".")[0]
    bigger = [n for n, i in catalog.instances().items()
              if n.startswith(family + ".") and i.devices_per_node >= cell.gpus]
    hint = f"; {', '.join(bigger)} has enough" if bigger else f"; use gpus <= {instance.devices_per_node} or more nodes"
    return f"{cell.instance} has {instance.devices_per_node} GPU(s), the cell asks for {cell.gpus} per node{hint}"


SHARED_CORE_RANKS = 2  # ranks a local CPU cell may put on one core (the study-5 twin's 4-rank hybrid on 2)


def cores_fit(cell: CellSpec) -> str | None:
    """A CPU cell's ranks are pinned to cores of this machine (every node of a local multi-node
    cell too). Up to two ranks may share a core (a 4-rank hybrid on a 2-core laptop: slower,
    and its tokens/s says so); more would crawl until the time limit (64 ranks on 2 cores ran
    300 s and ended `timeout`)."""
    instance = catalog.instances().get(cell.instance)
    if instance is None or not instance.local:
        return None
    per_rank, cores = catalog.cores_per_rank(instance), catalog.local_cores()
    needed = cell.world_size * per_rank
    if needed <= SHARED_CORE_RANKS * cores:
        return None
    nodes = f"{cell.nodes} nodes x {cell.gpus} ranks" if cell.nodes > 1 else f"{cell.world_size} ranks"
    fits, shared = max(1, cores // per_rank), max(1, SHARED_CORE_RANKS * cores // per_rank)
    single_node = " and nodes: 1" if cell.nodes > 1 else ""
    return (f"needs {needed} cores ({nodes} x {per_rank} per rank on {cell.instance}), and this machine has {cores}; "
            f"use gpus <= {fits} here (<= {shared} with ranks sharing cores){single_node}, or a GPU instance type "
            f"with compute: kubernetes, batch or sagemaker")


def fast_paths(cell: CellSpec) -> str | None:
    """The `train:` fast paths where they cannot run."""
    t = cell.train
    if t.fused_optimizer == "on" and t.optimizer == "paged_adamw_8bit":
        return "train.fused_optimizer: on is PyTorch's fused AdamW/SGD; paged_adamw_8bit is bitsandbytes' own kernel"
    instance = catalog.instances().get(cell.instance)
    if t.liger and instance is not None and instance.local:
        return (f"train.liger: Liger Kernel's kernels are Triton GPU kernels and {cell.instance} is a CPU; "
                f"use a GPU instance (local-gpu)")
    if t.compile != "off" and cell.layout.deepspeed:
        return (f"train.compile: {t.compile} with DeepSpeed ({cell.strategy}): DeepSpeed wraps the module and "
                f"compiles through its own engine; use fsdp for sharded training with compile")
    if t.compile != "off" and cell.layout.model_split is not None:
        return (f"train.compile: {t.compile} with {cell.strategy}: the stages and tensor-parallel layers "
                f"are not compiled here; use ddp or fsdp with compile")
    if t.compile == "model" and cell.strategy == "fsdp":
        return "train.compile: model with fsdp: FSDP2 units are the decoder layers; use compile: layers"
    if t.loss == "chunked" and (cell.layout.model_split or "weights" in cell.layout.sharded | cell.layout.offloaded):
        return (f"train.loss: chunked reads the output head's weight after the forward pass; under "
                f"{cell.strategy} it is split or sharded then; use single, ddp, zero1 or zero2, or loss: logits")
    if t.loss == "chunked" and t.compile == "model":
        return "train.loss: chunked taps the output head, which a compiled model has traced; use compile: layers"
    if t.compile != "off" and cell.peft == "qlora":
        return "train.compile: bitsandbytes' 4-bit layers break torch.compile's graphs; use compile: off for qlora"
    return None


RULES: list[Callable[[CellSpec], str | None]] = [
    quantized_tensor_parallel, dora_tensor_parallel, adapter_on_sharded_head, hybrid_shape, model_split_of_one,
    split_fits_model, precision_supported, devices_fit, cores_fit, fast_paths,
]


def adapter_key(cell: CellSpec) -> str:
    """Cells that ask PEFT the same question share its answer (QLoRA's adapter is LoRA's)."""
    lora = cell.train.lora
    peft = "lora" if cell.peft == "qlora" else cell.peft
    return json.dumps([peft, lora.r, lora.target_modules], separators=(",", ":"))


def adapter_facts(cell: CellSpec, model: dict[str, Any]) -> dict[str, Any]:
    """The model's facts about the cell's adapter (`steps.trainer.facts`); {} where none were read."""
    return model.get("adapters", {}).get(adapter_key(cell)) or {}


PEFT_TENSOR_STYLES = ("colwise", "rowwise")  # the plan styles PEFT shards adapters along with


def model_refusal(cell: CellSpec, model: dict[str, Any] | None) -> str | None:
    """What the model's own facts (`steps.trainer.facts`) rule out; None without facts."""
    if not model or "error" in model:
        return None
    split, ways, kind = cell.layout.model_split, cell.layout.mp_size, model["model_type"]
    if cell.peft == "qlora" and model.get("unquantizable"):
        odd = model["unquantizable"]
        return (f"QLoRA would train {kind} unquantized: bitsandbytes quantizes torch.nn.Linear layers and "
                f"{kind}'s {', '.join(sorted(odd))} are {', '.join(sorted(set(odd.values())))}; use lora")
    adapter = adapter_facts(cell, model)
    # Asked for outright (`true`), the kernels refuse a model they cannot compute; under `auto`
    # such a cell runs PEFT's modules and says why (steps.plan.lora_kernels).
    if cell.train.lora_kernels == "true" and lora_kernels.applies(cell) and adapter.get("not_plain"):
        odd = adapter["not_plain"]
        plain = sorted(set(adapter.get("targeted", [])) - set(odd))
        instead = f"target_modules among {', '.join(plain)}, or " if plain else ""
        return (f"train.lora_kernels: {lora_kernels.model_why_not(kind, odd)}; "
                f"use {instead}lora_kernels: auto (PEFT's modules for this model)")
    if split == "tensor" and not model["tensor_plan"]:
        return (f"tensor parallelism needs the model's own tensor-parallel plan and transformers has "
                f"none for {kind}; use fsdp or zero3 to shard it, or pipeline")
    if split == "pipeline" and model.get("pipeline_split"):
        return f"the pipeline cannot cut {kind} into stages: {model['pipeline_split']}; use fsdp or zero3"
    if split == "pipeline" and (model.get("layers") or ways) < ways:
        return (f"pipeline over {ways} ranks needs at least {ways} layers, {cell.model} has "
                f"{model['layers']}; use fewer ranks or ddp/fsdp")
    if split == "tensor" and cell.peft != "full":
        styles = model.get("tensor_styles", {})
        targeted = adapter.get("targeted") or []
        odd = sorted(t for t in targeted if styles.get(t, "colwise") not in PEFT_TENSOR_STYLES)
        if odd:
            shown = ", ".join(f"{t} as {styles[t]}" for t in odd)
            fine = sorted(t for t, style in styles.items() if style in PEFT_TENSOR_STYLES)
            other = f", or target_modules among {', '.join(fine)}" if fine else ""
            return (f"PEFT makes LoRA adapters tensor-parallel only on layers split colwise or rowwise, and "
                    f"{kind}'s plan splits {shown}; use fsdp or zero3{other}")
    if split == "tensor":
        heads, kv = model.get("attention_heads") or ways, model.get("kv_heads") or ways
        if heads % ways or kv % ways:
            return (f"tensor parallelism over {ways} ranks needs attention heads ({heads}) and "
                    f"key/value heads ({kv}) divisible by {ways}; use a divisor of {kv} ranks")
    return None


def refusal(cell: CellSpec) -> str | None:
    for rule in RULES:
        if reason := rule(cell):
            return reason
    return None
