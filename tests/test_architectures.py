"""Any causal LM transformers ships, under every strategy that can work for it: small random
models of eleven architectures, saved as Hugging Face folders (nothing downloaded), trained
with LoRA (PEFT's default targets for each) under single, ddp, fsdp, zero3, tensor and pipeline
and with QLoRA under ddp and zero3. Every cell trains or is refused before launch with the
reason; the strategies give the losses of one process; the adapter is PEFT's own.

One torchrun launch per world size trains them all (`tests/one_launch.py`).
"""

from __future__ import annotations

import math

import pytest

from steps.plan import compat, preflight
from tests.conftest import make_cell, torchrun_cells

pytestmark = pytest.mark.slow

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=300)
# Dropout off, so that the strategies can be compared number for number.
ARCHITECTURES = {
    "llama": SMALL,
    "qwen2": SMALL,
    "qwen3": {**SMALL, "head_dim": 16},
    "mistral": SMALL,
    "gemma2": {**SMALL, "head_dim": 16},
    "gemma3_text": {**SMALL, "head_dim": 16},
    "phi3": {**SMALL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=300, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, vocab_size=300, hidden_dropout=0.0, attention_dropout=0.0),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256, vocab_size=300, dropout=0.0, attention_dropout=0.0),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=300,
                   max_position_embeddings=256, hidden_dropout=0.0, attention_dropout=0.0),
}
STEPS = 3
# (peft, strategy, processes, micro-batch, accumulation): a global batch of 4 everywhere.
RUNS = [("lora", "single", 1, 4, 1), ("lora", "ddp", 2, 2, 1), ("lora", "fsdp", 2, 2, 1),
        ("lora", "zero3", 2, 2, 1), ("lora", "tensor", 2, 4, 1), ("lora", "pipeline", 2, 2, 2),
        ("qlora", "ddp", 2, 2, 1), ("qlora", "zero3", 2, 2, 1)]
IDS = [f"{p}-{s}" for p, s, *_ in RUNS]
# Full fine-tuning of tied embeddings through a pipeline, against one process.
TIED = [("gpt2", ("full", "single", 1, 4, 1)), ("gpt2", ("full", "pipeline", 2, 2, 2))]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for kind, config in ARCHITECTURES.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(kind)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config)).save_pretrained(folder)
        out[kind] = str(folder)
    return out


def _cell(folder: str, peft: str, strategy: str, gpus: int, micro_batch: int, grad_accum: int):
    return make_cell(model=folder, peft=peft, strategy=strategy, gpus=gpus, micro_batch=micro_batch,
                     grad_accum=grad_accum, seq_len=24, train={"max_steps": STEPS, "eval_every": 0},
                     data={"train_samples": 48, "val_samples": 8})


@pytest.fixture(scope="module")
def facts(folders):
    return preflight.gather_facts([_cell(f, *run) for f in folders.values() for run in RUNS])


@pytest.fixture(scope="module")
def runs(folders, facts, tmp_path_factory):
    """{(architecture, run id): (cell, metrics or the refusal)}: one launch per world size."""
    root = tmp_path_factory.mktemp("architectures")
    out, launches = {}, {}
    for run, run_id in zip(RUNS, IDS, strict=True):
        for kind, folder in folders.items():
            cell = _cell(folder, *run)
            reason = compat.refusal(cell) or compat.model_refusal(cell, facts["models"][folder])
            if reason:
                out[(kind, run_id)] = (cell, {"outcome": "refused", "error": reason})
            else:
                launches.setdefault(cell.world_size, []).append((kind, run_id, cell))
    for kind, run in TIED:
        cell = _cell(folders[kind], *run)
        launches[cell.world_size].append((kind, f"{run[0]}-{run[1]}", cell))
    for todo in launches.values():
        _, found = torchrun_cells([c for *_, c in todo], [root / f"{k}-{r}" for k, r, _ in todo], timeout=900)
        out.update({(kind, run_id): (cell, m) for (kind, run_id, cell), m in zip(todo, found, strict=True)})
    return out


def _peft_count(folder: str, peft: str) -> int:
    """PEFT's own count of trainable parameters for its default targets, on the real model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16)
    if model.config.model_type in ("phi3",):  # PEFT has no default for these: all-linear
        config.target_modules = "all-linear"
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


def test_the_refusals_are_the_models_own_limits(runs):
    refused = {key: m["error"] for key, (_, m) in runs.items() if m["outcome"] == "refused"}
    assert refused == {(kind, "lora-tensor"): (
        f"tensor parallelism needs the model's own tensor-parallel plan and transformers has none for "
        f"{kind}; use fsdp or zero3 to shard it, or pipeline") for kind in ("gpt2", "opt", "falcon")} | {
        ("phi3", "lora-tensor"): "PEFT makes LoRA adapters tensor-parallel only on layers split colwise or "
        "rowwise, and phi3's plan splits down_proj as rowwise_split_input, gate_up_proj as colwise_gather_output, "
        "o_proj as rowwise_split_input, qkv_proj as colwise_gather_output; use fsdp or zero3"} | {
        ("falcon", run): "QLoRA would train falcon unquantized: bitsandbytes quantizes torch.nn.Linear layers "
        "and falcon's dense, dense_4h_to_h, dense_h_to_4h, query_key_value are FalconLinear; use lora"
        for run in ("qlora-ddp", "qlora-zero3")}


# PEFT's default targets that are not bias-free Linear layers: by default (`train.lora_kernels:
# auto`) these models train on PEFT's modules, the others through the LoRA kernels.
NOT_PLAIN = {"qwen2": "q_proj (Linear with a bias), v_proj (Linear with a bias) are",
             "gpt2": "c_attn (Conv1D with a bias) is", "gpt_neox": "query_key_value (Linear with a bias) is",
             "opt": "q_proj (Linear with a bias), v_proj (Linear with a bias) are"}


@pytest.mark.parametrize("kind", list(ARCHITECTURES))
def test_every_architecture_trains_under_every_strategy_it_can(runs, folders, kind):
    count = _peft_count(folders[kind], "lora")
    _, one = runs[(kind, "lora-single")]
    if kind in NOT_PLAIN:
        assert (one["lora_kernels"], one["lora_kernels_off"]) == (
            None, f"the kernels compute LoRA on bias-free Linear layers and {kind}'s {NOT_PLAIN[kind]} not")
    else:
        assert one["lora_kernels"]["linear"] > 0 and one["lora_kernels_off"] is None, one["lora_kernels"]
    single = [p["loss"] for p in runs[(kind, "lora-single")][1]["loss_curve"]]
    assert len(single) == STEPS and all(math.isfinite(x) for x in single)
    for run_id in IDS:
        cell, m = runs[(kind, run_id)]
        if m["outcome"] == "refused":
            continue
        assert m["outcome"] == "ok", (run_id, m["error"])
        assert m["trainable_params"] == count, run_id
        losses = [p["loss"] for p in m["loss_curve"]]
        if cell.peft == "lora":  # one process's numbers, within float reassociation
            assert losses == pytest.approx(single, rel=2e-4), run_id
        else:  # 4-bit weights: close to the 32-bit run, not equal
            assert losses == pytest.approx(single, rel=0.05), run_id


def test_full_fine_tuning_of_tied_embeddings_through_a_pipeline(runs):
    """GPT-2's head is its token embedding: the first stage trains it as the embedding, the last
    as the head, and their gradients are added before each step, so the pipeline's losses are
    one process's (and the two copies stay equal)."""
    (_, one), (_, two) = runs[("gpt2", "full-single")], runs[("gpt2", "full-pipeline")]
    assert (one["outcome"], two["outcome"]) == ("ok", "ok"), (one["error"], two["error"])
    losses = [[p["loss"] for p in m["loss_curve"]] for m in (one, two)]
    assert losses[1] == pytest.approx(losses[0], rel=2e-4)
    assert losses[0][-1] < losses[0][0] - 0.05  # full fine-tuning at lr 1e-3 moves the loss
    assert two["trainable_params"] == one["trainable_params"] == one["total_params"]
