"""Mistakes knowable before launch are found in `start`, all at once, from the models' own facts
(built on the meta device, the adapter applied by PEFT) and the data files; and what the facts
rule out becomes a refusal with the reason. Models here are small random ones saved as Hugging
Face folders (nothing downloaded)."""

from __future__ import annotations

import os
import time

import pytest

from steps.estimate import planner
from steps.plan import compat, preflight
from steps.plan.matrix import expand, parse_matrix
from steps.plan.schema import ConfigError
from tests.conftest import make_cell

TINY = {
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=300),
    "phi3": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=512, vocab_size=300, pad_token_id=0),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Random models saved as Hugging Face folders, as a user's own model would be."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for kind, config in TINY.items():
        torch.manual_seed(0)
        folder = tmp_path_factory.mktemp(kind)
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config)).save_pretrained(folder)
        out[kind] = str(folder)
    return out


def _cells(folders, **train):
    cells = [make_cell(model=m, train=train) for m in ("llama-debug", folders["gpt2"], folders["phi3"])]
    return cells + [make_cell(model=m, peft="full") for m in ("llama-debug", folders["gpt2"])]


@pytest.fixture(scope="module")
def facts(folders):
    """One `steps.trainer.facts` run for every model and adapter setting the tests ask about."""
    cells = _cells(folders) + _cells(folders, lora={"target_modules": "all-linear"}) + _cells(
        folders, lora={"target_modules": r".*\.(q_proj|c_attn|qkv_proj)"})
    return preflight.gather_facts(cells)


def _peft_count(folder_or_preset: str, cell) -> int:
    """PEFT's own count of trainable parameters, on the real (CPU) model."""
    import torch
    from peft import LoraConfig, get_peft_model

    from steps.trainer import modeling

    torch.manual_seed(0)
    if folder_or_preset == "llama-debug":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(modeling.model_config(cell, 259))
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder_or_preset)
    if cell.peft == "full":
        return sum(p.numel() for p in model.parameters())
    config = LoraConfig(task_type="CAUSAL_LM", r=cell.train.lora.r, lora_alpha=cell.train.lora.alpha,
                        target_modules=cell.train.lora.target_modules)
    if cell.train.lora.target_modules is None and model.config.model_type == "phi3":
        config.target_modules = "all-linear"  # PEFT has no default for Phi-3
    return get_peft_model(model, config).get_nb_trainable_parameters()[0]


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
def test_models_facts_come_from_the_model(facts, folders):
    models = facts["models"]
    llama, gpt2, phi3 = models["llama-debug"], models[folders["gpt2"]], models[folders["phi3"]]
    assert (llama["model_type"], llama["context"], llama["tensor_plan"], llama["tied_embeddings"]) == (
        "llama", 1024, True, False)
    assert (gpt2["model_type"], gpt2["context"], gpt2["tensor_plan"], gpt2["tied_embeddings"]) == (
        "gpt2", 256, False, True)
    assert gpt2["linear_names"] == ["c_attn", "c_fc", "c_proj", "lm_head"]
    assert (phi3["context"], phi3["tensor_plan"], "qkv_proj" in phi3["linear_names"]) == (512, True, True)
    assert "sdpa" in llama["attention"] and "eager" in llama["attention"]
    assert facts["machine"] == {"gpus": []}


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
@pytest.mark.parametrize("targets", [None, "all-linear", r".*\.(q_proj|c_attn|qkv_proj)"])
def test_adapter_facts_are_peft_s_own_count(facts, folders, targets):
    """Unset: PEFT's default (q_proj, v_proj for Llama, c_attn for GPT-2; all-linear for Phi-3,
    which PEFT has none for); all-linear and regular expressions as PEFT reads them."""
    for cell in _cells(folders, lora={"target_modules": targets}):
        entry = facts["models"][cell.model]["adapters"][preflight.adapter_key(cell)]
        assert entry["trainable_params"] == _peft_count(cell.model, cell), (cell.model, targets)
    adapted = {m: facts["models"][c.model]["adapters"][preflight.adapter_key(c)].get("targeted")
               for m, c in zip(("llama", "gpt2", "phi3"), _cells(folders, lora={"target_modules": targets}))}
    if targets is None:
        assert adapted == {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
                           "phi3": ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]}


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
def test_what_the_model_cannot_do_is_refused_with_the_reason(facts, folders):
    gpt2 = facts["models"][folders["gpt2"]]
    tensor = make_cell(model=folders["gpt2"], strategy="tensor", gpus=2)
    assert compat.model_refusal(tensor, gpt2) == (
        "tensor parallelism needs the model's own tensor-parallel plan and transformers has none "
        "for gpt2; use fsdp or zero3 to shard it, or pipeline")
    # GPT-2's tied embeddings are no obstacle to a pipeline (test_architectures trains it); more
    # stages than layers are.
    assert gpt2["pipeline_split"] is None
    assert compat.model_refusal(make_cell(model=folders["gpt2"], strategy="pipeline", gpus=2), gpt2) is None
    assert compat.model_refusal(make_cell(model=folders["gpt2"], strategy="pipeline", gpus=4), gpt2) == (
        f"pipeline over 4 ranks needs at least 4 layers, {folders['gpt2']} has 2; use fewer ranks or ddp/fsdp")
    llama = facts["models"]["llama-debug"]
    assert compat.model_refusal(make_cell(strategy="tensor", gpus=2), llama) is None
    assert compat.model_refusal(make_cell(strategy="pipeline", gpus=2), llama) is None
    # train.lora_kernels: bias-free torch.nn.Linear layers only (GPT-2's are Conv1D with a bias)
    kernels = {"lora_kernels": True}
    assert compat.model_refusal(make_cell(model=folders["gpt2"], train=kernels), gpt2) == (
        "train.lora_kernels: the kernels compute LoRA on bias-free Linear layers and gpt2's c_attn (Conv1D with "
        "a bias) is not; use lora_kernels: auto (PEFT's modules for this model)")
    # by default (auto) the cell runs PEFT's modules, and its plan counts them
    assert compat.model_refusal(make_cell(model=folders["gpt2"]), gpt2) is None
    assert planner.kernels_off(make_cell(model=folders["gpt2"]), facts["models"]) == (
        "the kernels compute LoRA on bias-free Linear layers and gpt2's c_attn (Conv1D with a bias) is not")
    assert planner.kernels_off(make_cell(), facts["models"]) is None
    everything = {**kernels, "lora": {"target_modules": "all-linear"}}
    assert compat.model_refusal(make_cell(model=folders["gpt2"], train=everything), gpt2) == (
        "train.lora_kernels: the kernels compute LoRA on bias-free Linear layers and gpt2's c_attn (Conv1D with "
        "a bias), c_fc (Conv1D with a bias), c_proj (Conv1D with a bias) are not; use lora_kernels: auto (PEFT's "
        "modules for this model)")
    assert compat.model_refusal(make_cell(train=everything), llama) is None
    # where the kernels cannot serve the cell anyway (ZeRO-3), PEFT's modules run: nothing to refuse
    assert compat.model_refusal(make_cell(model=folders["gpt2"], strategy="zero3", gpus=2, train=kernels), gpt2) is None
    phi3 = facts["models"][folders["phi3"]]
    assert compat.model_refusal(make_cell(model=folders["phi3"], peft="qlora", train=kernels), phi3) is None


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
def test_every_pre_launch_mistake_is_reported_together(tmp_path, folders):
    bad = tmp_path / "chat.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n\n{"instruction": "c", \n')
    spec = parse_matrix({
        "name": "mistakes", "models": ["llama-debug", folders["gpt2"]], "peft": "lora",
        "strategy": "single", "lr": 1e-3, "seq_len": [64, 1_000_000], "instance": ["local-cpu", "p3.2xlarge"],
        "train": {"lora": {"target_modules": ["q_proj", "query"]}},
        "data": {"task": "instructions", "path": str(bad)},
        "include": [{"models": "llama-debug", "data": {"task": "instructions", "path": str(tmp_path / "absent.jsonl")}}],
    })
    with pytest.raises(ConfigError) as err:
        preflight.check(spec, expand(spec))
    problems = err.value.problems
    assert problems == [
        "train.lora.target_modules: ['q_proj', 'query'] on llama-debug (llama): query match(es) no module of the "
        "model; its linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj (or "
        "use all-linear, or leave it unset for PEFT's default)",
        "seq_len: 1000000 is longer than the context of llama-debug (1024 tokens); use seq_len <= 1024",
        f"train.lora.target_modules: ['q_proj', 'query'] on {folders['gpt2']} (gpt2): q_proj, query match(es) no "
        f"module of the model; its linear layers are c_attn, c_fc, c_proj, lm_head (or use all-linear, or leave it "
        f"unset for PEFT's default)",
        f"seq_len: 1000000 is longer than the context of {folders['gpt2']} (256 tokens); use seq_len <= 256",
        f"data.path: '{tmp_path / 'absent.jsonl'}' does not exist (task 'instructions'); give the file or folder, "
        f"absolute or relative to {os.getcwd()}",
        f"data.path: {bad}:3: not valid JSON (Expecting property name enclosed in double quotes: line 2 column 1 "
        f"(char 22))",
        "instance: p3.2xlarge (NVIDIA V100-SXM2-16GB) with compute: local would train on this machine, which has "
        "no GPU; use compute: sagemaker (or kubernetes, batch, slurm) to run on p3.2xlarge, or instance: local-cpu to train "
        "here",
    ]


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
def test_a_hub_id_that_cannot_be_reached_fails_fast_with_the_offline_hint(monkeypatch):
    cell = make_cell(model="nobody-here/absent-model-xyz")
    start = time.perf_counter()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A preset's pretrained weights and tokenizer come from the Hub too.
    models = preflight.gather_facts([cell, make_cell(model="tinyllama-1.1b")])["models"]
    assert models["tinyllama-1.1b"]["error"].startswith(
        "not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it once where the Hub is reachable "
        "(`hf download TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T`)")
    offline = models[cell.model]["error"]
    assert offline == ("not in the local Hugging Face cache and HF_HUB_OFFLINE=1; download it once where the Hub "
                       "is reachable (`hf download nobody-here/absent-model-xyz`) and set HF_HUB_OFFLINE=1, or name "
                       "a local folder")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    online = preflight.gather_facts([cell])["models"][cell.model]["error"]
    assert online.startswith("the Hugging Face Hub cannot be reached (") or online.startswith(
        "the Hugging Face Hub has no model 'nobody-here/absent-model-xyz'"), online
    assert time.perf_counter() - start < 60  # not transformers' minutes of retries


@pytest.mark.slow
def test_mistakes_fail_the_flow_in_start_before_any_cell(tmp_path):
    from metaflow import Run, namespace

    from tests.test_flow import run_flow

    matrix = {"name": "mistakes", "models": "llama-debug", "peft": "lora", "strategy": "single",
              "lr": 1e-3, "seq_len": 4096, "data": {"task": "instructions", "path": str(tmp_path / "absent.jsonl")}}
    status, pathspec, output = run_flow(tmp_path, matrix)
    assert status == "failed"
    namespace(None)
    run = Run(pathspec)
    assert [s.id for s in run] == ["start"]  # no launch, no train
    assert "mistakes: 2 problem(s):" in output
    assert "seq_len: 4096 is longer than the context of llama-debug (1024 tokens); use seq_len <= 1024" in output
    assert f"data.path: '{tmp_path / 'absent.jsonl'}' does not exist" in output


def test_a_gpu_instance_runs_locally_where_this_machine_has_that_gpu():
    spec = parse_matrix({"name": "g", "models": "llama-debug", "peft": "lora", "strategy": "ddp", "gpus": 2,
                         "lr": 1e-3, "instance": ["p3.8xlarge", "g5.12xlarge"]})
    two_v100 = {"gpus": ["Tesla V100-SXM2-16GB", "Tesla V100-SXM2-16GB"]}
    assert preflight.machine_problems(spec, two_v100) == [
        "instance: g5.12xlarge (NVIDIA A10G) with compute: local would train on this machine, which has 2 GPU(s): "
        "Tesla V100-SXM2-16GB, Tesla V100-SXM2-16GB; use compute: sagemaker (or kubernetes, batch, slurm) to run on "
        "g5.12xlarge, or instance: local-gpu to train here"]
    assert preflight.machine_problems(spec.model_copy(update={"compute": "sagemaker"}), two_v100) == []


@pytest.mark.slow  # reads model facts in a subprocess (torch, transformers: seconds)
def test_the_cell_listing_checks_before_it_lists(tmp_path, capsys):
    from steps.plan import matrix

    path = tmp_path / "m.yaml"
    path.write_text("name: long\nmodels: llama-debug\npeft: lora\nstrategy: single\nlr: 0.001\nseq_len: 2048\n")
    assert matrix.main([str(path)]) == 2
    assert "seq_len: 2048 is longer than the context of llama-debug (1024 tokens)" in capsys.readouterr().err
    assert matrix.main([str(path), "--no-check"]) == 0
