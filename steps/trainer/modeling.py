"""Model, tokenizer and adapters for a cell: a preset built with random weights, or any
Hugging Face causal LM by hub id or local directory (`from_pretrained`)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from steps import cache_root
from steps.plan import catalog
from steps.plan import lora_kernels as where  # where train.lora_kernels applies
from steps.plan.schema import ALL_LINEAR, CellSpec
from steps.trainer.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
                "uint8": torch.uint8}


def block_unused_imports(cells: list[CellSpec]) -> None:
    """peft and transformers import bitsandbytes whenever it is installed (about 1 s per
    process); where no cell has 4-bit weights or an 8-bit optimizer it is made to look absent."""
    if all(c.peft != "qlora" and c.train.optimizer != "paged_adamw_8bit" for c in cells):
        sys.modules.setdefault("bitsandbytes", None)  # find_spec() then returns None


def load_tokenizer(cell: CellSpec) -> Tokenizer:
    """The model directory's tokenizer when it has one, otherwise the built-in byte tokenizer."""
    preset = catalog.model_presets().get(cell.model)
    if cell.train.tokenizer == "byte":
        source = None
    elif preset:
        source = None if preset.tokenizer == "byte" else preset.tokenizer
    else:
        source = cell.model
    if source is None or (
        Path(source).is_dir() and not any(Path(source, f).exists() for f in TOKENIZER_FILES)
    ):
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(source, trust_remote_code=cell.train.trust_remote_code))


def weights_dtype(cell: CellSpec) -> torch.dtype:
    """The dtype the base model is loaded in, as PEFT, torchtune and Axolotl lay memory out:
    bf16-true keeps every weight (and so the optimizer states) in bf16; under mixed precision a
    frozen base (LoRA, DoRA) is stored in the compute dtype, since it only ever feeds bf16/fp16
    matmuls, while the adapters PEFT adds stay fp32 (`autocast_adapter_dtype`); full fine-tuning
    keeps fp32 master weights, which autocast casts per matmul."""
    if cell.precision == "bf16-true":
        return torch.bfloat16
    if cell.precision in ("bf16-mixed", "fp16-mixed") and cell.peft != "full":
        return compute_dtype(cell)
    return torch.float32


def compute_dtype(cell: CellSpec) -> torch.dtype:
    return {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16,
            "fp16-mixed": torch.float16}.get(cell.precision, torch.float32)


def autocast_dtype(cell: CellSpec) -> torch.dtype | None:
    """What matmuls are autocast to (None: nothing autocasts). Mixed precision autocasts; so does
    bf16-true with adapters: the base and the residual stream are bf16, and the adapters keep
    fp32 master weights for the optimizer (PEFT's `autocast_adapter_dtype`) but compute in bf16,
    as LitGPT's and torchtune's bf16 adapters do. Without it PEFT would cast each adapted
    layer's input up to fp32 and keep that copy for backward."""
    if cell.precision in ("bf16-mixed", "fp16-mixed"):
        return compute_dtype(cell)
    if cell.precision == "bf16-true" and cell.peft != "full":
        return torch.bfloat16
    return None


def is_random_init(cell: CellSpec) -> bool:
    return catalog.random_init(cell)


# The probe (`steps.trainer.probe`) times models of one and two layers of a cell's shape.
_LAYERS: list[int] = []


@contextlib.contextmanager
def layer_count(n: int):
    """Models built inside have `n` decoder layers, whatever their configuration says."""
    _LAYERS.append(n)
    try:
        yield
    finally:
        _LAYERS.pop()


def model_config(cell: CellSpec, vocab_size: int):
    from transformers import AutoConfig

    preset = catalog.model_presets().get(cell.model)
    if preset and preset.config:
        config = AutoConfig.for_model(**{"vocab_size": vocab_size, **preset.config})
    else:
        config = AutoConfig.from_pretrained(_source(cell), trust_remote_code=cell.train.trust_remote_code)
    if config.vocab_size < vocab_size:
        raise ValueError(f"model vocab {config.vocab_size} is smaller than the tokenizer's {vocab_size}")
    if _LAYERS:
        config.num_hidden_layers = _LAYERS[-1]
        if getattr(config, "layer_types", None):  # per-layer attention kinds (newer configs)
            config.layer_types = config.layer_types[: _LAYERS[-1]]
    return config


def _source(cell: CellSpec) -> str:
    preset = catalog.model_presets().get(cell.model)
    if preset is None:
        return cell.model
    if not preset.source:
        raise ValueError(f"preset {cell.model!r} has no `source` to load pretrained weights from; use init: random")
    return preset.source


def draw_device(cell: CellSpec, device: torch.device) -> torch.device:
    """Where a cell's random weights are drawn (`train.init_device`)."""
    return device if cell.train.init_device == "device" and device.type == "cuda" else torch.device("cpu")


def random_checkpoint(cell: CellSpec, vocab_size: int, device: torch.device | None = None) -> Path:
    """Random weights saved once per (architecture, seed, where they are drawn) on this machine,
    so that loaders that only take a directory (4-bit quantisation, tensor-parallel plans) can
    build them too."""
    config = model_config(cell, vocab_size)
    draw = draw_device(cell, device or torch.device("cpu"))
    key_data = {"config": config.to_dict(), "seed": cell.train.seed}
    if draw.type != "cpu":
        key_data["draw"] = draw.type
    key = json.dumps(key_data, sort_keys=True, default=str)
    folder = cache_root() / "random-init" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (folder / "complete").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per machine; the others wait, then read
        if not (folder / "complete").exists():
            from safetensors.torch import save_model
            from transformers import AutoModelForCausalLM

            torch.manual_seed(cell.train.seed)
            with draw:
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model = model.to("cpu")
            # Not model.save_pretrained: under torch.distributed it writes on global rank 0
            # only, and the writer here is whichever rank of this machine took the lock.
            config.save_pretrained(folder)
            save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / "complete").touch()
    return folder


def attn_implementation(cell: CellSpec) -> str | None:
    """None lets transformers pick the fastest implementation the model supports."""
    return None if cell.train.attn_implementation == "auto" else cell.train.attn_implementation


def lora_targets(cell: CellSpec, model_type: str) -> list[str] | str:
    """The cell's target_modules, or PEFT's default for the architecture; where PEFT has none
    (Phi-3's fused qkv_proj, for one), every linear layer but the head."""
    targets = cell.train.lora.target_modules
    if targets is not None:
        return targets
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    return list(DEFAULTS.get(model_type, [])) or ALL_LINEAR


def quantization_config(cell: CellSpec):
    from transformers import BitsAndBytesConfig

    q = cell.train.qlora
    compute = compute_dtype(cell) if q.compute_dtype == "auto" else TORCH_DTYPES[q.compute_dtype]
    storage = q.quant_storage
    if storage == "auto":  # sharding needs every parameter of a shard in one float dtype
        storage = ("bf16" if cell.precision.startswith("bf16") else "fp32") if (
            "weights" in cell.layout.sharded) else "uint8"
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=TORCH_DTYPES[storage],
    )


def load_model(cell: CellSpec, vocab_size: int, device: torch.device, tp_mesh=None) -> torch.nn.Module:
    """The base model on `device`. Random init is seeded, so every rank builds the same weights.

    tp_mesh: shard it with the model's tensor-parallel plan over this (1-D, "tp") device mesh.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": weights_dtype(cell), "attn_implementation": attn_implementation(cell),
                              "trust_remote_code": cell.train.trust_remote_code}
    if is_random_init(cell) and cell.peft != "qlora":
        torch.manual_seed(cell.train.seed)
        config = model_config(cell, vocab_size)
        # Drawn in fp32 whatever the precision, then stored in its dtype: every precision trains
        # the same weights (rounded), and drawing in bf16 gives other numbers on some torch builds.
        with draw_device(cell, device):
            model = AutoModelForCausalLM.from_config(config, **{**kwargs, "dtype": torch.float32})
        model = model.to(device=device, dtype=kwargs["dtype"])
    else:
        # 4-bit quantisation happens while loading, so random weights go through a directory too.
        source = str(random_checkpoint(cell, vocab_size, device)) if is_random_init(cell) else _source(cell)
        if cell.peft == "qlora":
            kwargs.update(quantization_config=quantization_config(cell), device_map={"": device})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        model = model if cell.peft == "qlora" else model.to(device)
        if cell.peft == "qlora":
            _keep_4bit_weights_as_loaded(model)
    return model if tp_mesh is None else shard_tensor_parallel(model, tp_mesh)


def _keep_4bit_weights_as_loaded(model: torch.nn.Module) -> None:
    """bitsandbytes repacks a 4-bit weight in place for its CPU inference kernel the first time a
    layer runs in eval mode without gradients. ZeRO-3 keeps its own copy of each weight and
    gathers that copy back over the repacked one, so the layer then reads garbage; turn the
    repacking off (it only speeds up CPU inference)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def shard_tensor_parallel(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """Apply the model's own tensor-parallel plan over `tp_mesh`, as `from_pretrained(tp_plan=...)`
    does, but on a mesh we choose (transformers builds one over all ranks, and with data-parallel
    ranks it would also wrap the model in FSDP)."""
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    config = DistributedConfig(tp_size=tp_mesh.size(), tp_plan="auto")
    tp_plan, _, _ = model._resolve_parallel_plans(config)
    apply_tensor_parallelism(model, tp_mesh, _without_tied(model, tp_plan))
    # What peft reads to make its adapters tensor-parallel too.
    model.config.distributed_config = config
    model._device_mesh = tp_mesh
    model._tp_size = tp_mesh.size()
    return model


def _without_tied(model: torch.nn.Module, tp_plan: dict[str, str]) -> dict[str, str]:
    """The plan less the entries of a tied output embedding and the embedding it shares: both
    stay whole (replicated). transformers would look the head's weight up under the name the
    embedding owns and fail, and one matrix cannot be sharded two ways."""
    unique = {n for n, _ in model.named_parameters()}
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - unique
    if not tied:
        return tp_plan
    ids = {id(p): n for n, p in model.named_parameters()}
    every = dict(model.named_parameters(remove_duplicate=False))
    shared = tied | {ids[id(every[n])] for n in tied}
    drop = shared | {n.rpartition(".")[0] for n in shared}
    return {n: style for n, style in tp_plan.items() if n not in drop}


def apply_peft(model: torch.nn.Module, cell: CellSpec) -> torch.nn.Module:
    if cell.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cell.peft == "full":
        return model
    from peft import LoraConfig, get_peft_model

    # QLoRA without PEFT's `prepare_model_for_kbit_training`: it freezes the base (get_peft_model
    # does too), makes inputs require grads for reentrant checkpointing (ours is not reentrant),
    # and casts every weight it did not quantize to fp32, which under a 16-bit precision makes the
    # embeddings, norms and head fp32 and with them the whole residual stream and every saved
    # activation, so that QLoRA kept more than LoRA. Those weights stay in the cell's 16-bit
    # dtype, as LitGPT and torchtune keep them (the norms still compute in fp32 inside).
    lora = cell.train.lora
    torch.manual_seed(cell.train.seed + 1)  # adapter init is the same on every rank
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora_targets(cell, model.config.model_type), use_dora=cell.peft == "dora",
        ),
    )
    _fix_tensor_parallel_lora(model)
    _init_lora_a(model, cell.train.seed)
    if autocast_dtype(cell) is not None:
        _keep_adapter_inputs_16bit(model)
    _route_lora_kernels(model, cell)
    return model


def _route_lora_kernels(model: torch.nn.Module, cell: CellSpec) -> None:
    """Route the adapted layers through the LoRA kernels where `train.lora_kernels` serves the
    cell; elsewhere PEFT's modules run, and the row says why (`steps.plan.lora_kernels`). A model
    whose adapted layers are not all bias-free Linear layers keeps PEFT's modules whole (under
    `true` the plan refused it), so that it runs as it was planned. Sets the metrics
    `lora_kernels` (what ran through them) and `lora_kernels_off` (why not, from the model)."""
    if not where.applies(cell):
        return
    from steps.trainer import lora_kernels

    odd = lora_kernels.not_plain(model)
    if odd:
        model.lora_kernels_off = where.model_why_not(model.config.model_type, odd)
        return
    model.lora_kernels = lora_kernels.apply(model)


def _keep_adapter_inputs_16bit(model: torch.nn.Module) -> None:
    """Under autocast, PEFT's cast of an adapted layer's input to the adapter's dtype (fp32)
    makes a copy that autocast casts back for the matmul and keeps: one 16-bit copy per adapted
    layer, where the 16-bit input itself, kept once for the layers that share it, gives the same
    numbers (a 16-bit value cast up and down is itself). Turned off as PEFT's
    `disable_input_dtype_casting` does, for good: the matmuls autocast the fp32 adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


@torch.no_grad()
def _init_lora_a(model: torch.nn.Module, seed: int) -> None:
    """Draw every lora_A from its own generator, seeded by (seed, parameter name), with peft's
    distribution (kaiming-uniform, a=sqrt(5)). The adapters then start identical whatever the
    strategy: a tensor-parallel lora_A is built at its shard's size and would otherwise be drawn
    from a different stream of random numbers."""
    import math
    import zlib

    for name, p in model.named_parameters():
        if ".lora_A." not in name:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        fan_in = p.shape[1]
        full = (torch.rand(tuple(p.shape), generator=g, dtype=torch.float32) * 2 - 1) / math.sqrt(fan_in)
        if hasattr(p, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            full = distribute_tensor(full.to(p.to_local().device), p.device_mesh, p.placements)
        p.copy_(full.to(dtype=p.dtype, device=p.device))


def _fix_tensor_parallel_lora(model: torch.nn.Module) -> None:
    """peft builds lora_A of a row-parallel layer with the local in_features while its weight is
    a DTensor of the global shape; transformers' row-parallel hook reads `in_features` to
    rebuild the sharded input, so it must be the global size (else: a shape error)."""
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if base is not None and getattr(base, "_hf_tp_plan", None) == "rowwise":
            for lora_a in module.lora_A.values():
                lora_a.in_features = lora_a.weight.shape[-1]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights by the elements they represent."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if hasattr(p, "quant_state") and getattr(p, "quant_state", None) is not None:
            n = p.quant_state.shape.numel() if hasattr(p.quant_state, "shape") else n * 2
        elif hasattr(p, "full_tensor"):  # a DTensor shard: count the whole parameter
            n = p.shape.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def storage_dtype(params: list[torch.nn.Parameter]) -> str:
    """The dtype most of these parameters' elements are stored in ("4bit" for bitsandbytes'
    packed weights); "" for none."""
    counts: dict[str, int] = {}
    for p in params:
        name = "4bit" if type(p).__name__ == "Params4bit" else DTYPE_NAMES.get(p.dtype, str(p.dtype))
        counts[name] = counts.get(name, 0) + (p.shape.numel() if hasattr(p, "full_tensor") else p.numel())
    return max(counts, key=counts.get) if counts else ""


def embedding_parameters(model: torch.nn.Module) -> int:
    emb = model.get_input_embeddings()
    return emb.weight.shape.numel() if emb is not None else 0


def apply_fast_paths(model: torch.nn.Module, cell: CellSpec) -> torch.nn.Module:
    """The cell's `train.liger` and `train.compile`, in place (module names, and so checkpoints
    and adapters, stay as they were); before a strategy wraps or shards the model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if cell.train.liger:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
            _apply_liger_kernel_to_instance,
        )

        if base.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            raise ValueError(f"train.liger: Liger Kernel has no kernels for {base.config.model_type!r} models; "
                             f"it has them for {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}")
        # The loss stays this trainer's (a sum over target tokens from the logits).
        _apply_liger_kernel_to_instance(model=base, rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
        if getattr(model, "lora_kernels", None):  # Liger replaced the MLPs' forward: the LoRA MLP keeps less
            from steps.trainer import lora_kernels

            model.lora_kernels = lora_kernels.apply(model)
    # Inductor generates kernels; FINETUNE_MATRIX_COMPILE_BACKEND=aot_eager captures the same
    # graphs without generating code (the CPU tests: inductor's C++ build takes minutes there).
    backend = os.environ.get("FINETUNE_MATRIX_COMPILE_BACKEND", "inductor")
    if cell.train.compile == "layers":
        from steps.trainer.split import anatomy

        for layer in anatomy(base).layers:
            layer.compile(backend=backend)
    elif cell.train.compile == "model":
        model.compile(backend=backend)
    return model
