"""What `start` can know, `start` refuses: each kind of mistake below fails the flow in `start`,
before any cell's task, its problem (the key and the fix) the last lines on the terminal, no
traceback; a matrix of over 300 cells runs through the flow with no flag; 1,000 cells are
planned in under 10 s. Models are small random ones saved as Hugging Face folders."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from steps.plan import catalog, compat
from steps.plan.matrix import expand, parse_matrix
from tests.conftest import METAFLOW_ROOT, REPO, make_cell

FLOW = str(REPO / "flows" / "finetune_matrix.py")
BASE = {"name": "mistake", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3,
        "micro_batch": 4, "seq_len": 256, "train": {"max_steps": 6, "timing_warmup_steps": 1}}
CORES = catalog.local_cores()
RECORD = '{"instruction": "Say yes.", "response": "yes"}\n'


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Data files and model folders as a user would get them wrong."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, LlamaConfig

    root = tmp_path_factory.mktemp("mistakes")
    (root / "empty.jsonl").write_text("")
    (root / "four.jsonl").write_text(RECORD * 4)
    (root / "split").mkdir()
    (root / "split" / "train.jsonl").write_text(RECORD * 8)
    (root / "split" / "val.jsonl").write_text("")
    torch.manual_seed(0)
    bert = AutoConfig.for_model("bert", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                num_attention_heads=4, vocab_size=300)
    AutoModelForMaskedLM.from_config(bert).save_pretrained(root / "bert-mlm")
    LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=300).save_pretrained(root / "llama-config-only")
    return root


def _matrix(**changes) -> dict:
    out = {**BASE, **changes}
    for section in ("train", "data"):
        if section in changes:
            out[section] = {**BASE.get(section, {}), **changes[section]}
    return out


def _cell_id(matrix: dict) -> str:
    (planned,) = expand(parse_matrix(matrix))
    return planned.cell.cell_id


def _kinds(root) -> dict[str, tuple[dict, str]]:
    """Each mistake: the matrix, and the problem `start` ends with."""
    out = {}
    m = _matrix(data={"task": "instructions", "path": str(root / "empty.jsonl")})
    out["empty data file"] = (m, f"data.path: '{root / 'empty.jsonl'}' holds no records; give it examples, or point "
                                 "data.path at the file that has them")
    m = _matrix(data={"task": "instructions", "path": str(root / "four.jsonl")})
    out["fewer rows than one global batch"] = (m, (
        f"data.path: '{root / 'four.jsonl'}' gives 3 training row(s) (1 held out for validation by "
        "data.val_fraction=0.05), fewer than one global batch of 1 cell(s): 4 rows (the largest: 4 micro-batch x 1 "
        "accumulation x 1 data-parallel rank(s)); add examples, or lower micro_batch, grad_accum or gpus so that a "
        "step takes at most 3"))
    m = _matrix(data={"task": "instructions", "path": str(root / "split")})
    out["an empty validation file"] = (m, f"data.path: '{root / 'split'}' leaves no validation rows; give the "
                                          "validation split examples, or set train.evaluate: false")
    m = _matrix(seq_len=32, data={"task": "instructions", "path": str(root / "split")})
    out["prompts longer than seq_len"] = (m, (
        f"data.path: '{root / 'split'}' at seq_len 32: no training example keeps an answer token within seq_len=32 "
        "(the prompts are longer); raise seq_len"))
    bert = str(root / "bert-mlm")
    out["a model folder that is not a causal LM"] = (_matrix(models=bert), (
        f"models: '{bert}' cannot be loaded: its config.json was saved from BertForMaskedLM, not a causal language "
        "model; fine-tuning here trains a causal LM (its *ForCausalLM head): use a causal-LM checkpoint of bert"))
    bare = str(root / "llama-config-only")
    out["a model folder without weights"] = (_matrix(models=bare), (
        f"models: '{bare}' cannot be loaded: {bare} has a config.json but no weights (model.safetensors, "
        "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json) and train.init is 'auto' "
        "(pretrained); save the weights there, or set train.init: random to train this architecture from random "
        "weights"))
    m = _matrix(strategy="ddp", gpus=64)
    out["more ranks than this machine's cores"] = (m, (
        f"no cell can run: 1 cell(s) refused ({_cell_id(m)}): needs 64 cores (64 ranks x 1 per rank on local-cpu), "
        f"and this machine has {CORES}; use gpus <= {CORES} here (<= {2 * CORES} with ranks sharing cores), or a GPU "
        "instance type with compute: kubernetes, batch or sagemaker"))
    m = _matrix(train={"memory_cap_gb": 0.05})
    out["a memory cap far below the plan"] = (m, f"no cell can run: 1 cell(s) refused ({_cell_id(m)}): predicted out "
                                                 "of memory: ")
    m = _matrix(train={"max_steps": 1_000_000, "timeout_s": 30})
    out["a time limit far below the plan"] = (m, f"no cell can run: 1 cell(s) refused ({_cell_id(m)}): planned to "
                                                 "take ")
    m = _matrix(train={"lr_warmup_steps": 10})
    out["a learning-rate warm-up longer than the run"] = (m, (
        f"train.lr_warmup_steps: 10 is longer than the 6 steps the cell trains ({_cell_id(m)}): its learning rate "
        "would never reach lr; use lr_warmup_steps <= 6"))
    m = _matrix(train={"timing_warmup_steps": 6})
    out["a timing warm-up with no timed step"] = (m, (
        f"train.timing_warmup_steps: 6 leaves no timed step of the 6 the cell trains ({_cell_id(m)}), so it "
        "measures no tokens/s; use timing_warmup_steps < 6, or train longer"))
    return out


KINDS = ["empty data file", "fewer rows than one global batch", "an empty validation file",
         "prompts longer than seq_len", "a model folder that is not a causal LM", "a model folder without weights",
         "more ranks than this machine's cores", "a memory cap far below the plan", "a time limit far below the plan",
         "a learning-rate warm-up longer than the run", "a timing warm-up with no timed step"]


def _run(tmp_path, matrix: dict) -> tuple[int, str]:
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    env = {**os.environ, "FINETUNE_MATRIX_REPORTS": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, FLOW, "--config", "matrix", str(path), "run"], cwd=str(METAFLOW_ROOT),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    return proc.returncode, proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_each_mistake_fails_the_flow_in_start_with_the_key_and_the_fix_last(kind, assets, tmp_path):
    matrix, problem = _kinds(assets)[kind]
    code, output = _run(tmp_path, matrix)
    assert code != 0, output[-3000:]
    assert "/start/1" in output and "/launch/" not in output and "/train/" not in output  # no cell's task
    assert "Traceback" not in output and "Internal error" not in output
    lines = output.rstrip().splitlines()
    assert lines[-3:-1] == ["The matrix cannot run; start found, before any cell ran:", "mistake: 1 problem(s):"], \
        output[-3000:]
    assert lines[-1].startswith(f"  - {problem}"), lines[-1]
    if problem.endswith(": "):  # the estimate's numbers: the plan's own; the key and the fix pinned
        assert lines[-1].endswith({
            "a memory cap far below the plan": "what a rank may use, refused before launch: raise "
                                               "train.memory_cap_gb (0.05) or make the cell smaller, or set "
                                               "plan.try_predicted_oom: true to launch it anyway",
            "a time limit far below the plan": "over train.timeout_s=30: it would end `timeout`; raise "
                                               "train.timeout_s or lower train.max_steps",
        }[kind]), lines[-1]
    # The traceback is kept for whoever debugs the checks, in the run's folder.
    (log,) = (tmp_path / "reports").glob("*/start-error.log")
    assert "Traceback" in log.read_text() and f"(the traceback: {log})" in output


def test_the_cores_check_leaves_what_fits_and_refuses_beyond_two_ranks_a_core():
    assert compat.cores_fit(make_cell(strategy="ddp", gpus=CORES)) is None
    assert compat.cores_fit(make_cell(strategy="ddp", gpus=2 * CORES)) is None  # ranks sharing cores
    assert compat.cores_fit(make_cell(strategy="ddp", gpus=2 * CORES + 1)).startswith(
        f"needs {2 * CORES + 1} cores ({2 * CORES + 1} ranks x 1 per rank on local-cpu), and this machine has {CORES}")
    two = make_cell(strategy="ddp", gpus=CORES, instance="local-cpu-2c")  # two cores a rank
    assert compat.cores_fit(two) is None
    assert compat.cores_fit(make_cell(strategy="ddp", nodes=3, gpus=CORES, instance="local-cpu-2c")).startswith(
        f"needs {6 * CORES} cores (3 nodes x {CORES} ranks x 2 per rank on local-cpu-2c)")
    assert compat.cores_fit(make_cell(strategy="ddp", gpus=64, instance="g5.48xlarge")) is None  # not this machine


@pytest.mark.slow
def test_a_matrix_of_303_cells_runs_through_the_flow_with_no_flag(tmp_path):
    """101 cells that run (`plan.dry_run`: each its launch, train and gather tasks, without a
    trainer: more than Metaflow's 100 foreach branches by default) and 202 refused (a refused
    cell starts no task: its row joins the table as it is)."""
    from metaflow import Run, namespace

    from tests.test_flow import run_flow

    matrix = {"name": "many", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp", "fsdp"],
              "gpus": 64, "lr": [round(1e-4 * (i + 1), 6) for i in range(101)], "micro_batch": 4, "seq_len": 32,
              "train": {"max_steps": 4, "timing_warmup_steps": 1}, "plan": {"dry_run": True}}
    status, pathspec, output = run_flow(tmp_path, matrix, max_workers=4)  # 16 tasks at once thrash 2 cores
    assert status == "successful", output[-3000:]
    namespace(None)
    run = Run(pathspec)
    assert len(list(run["train"])) == len(list(run["gather"])) == 101
    from metaflow.cards import get_cards
    from metaflow.plugins.cards.exception import CardNotPresentException

    # no card where nothing trains (three card processes a cell saved)
    for step in ("train", "gather"):
        with pytest.raises(CardNotPresentException):
            get_cards(next(iter(run[step])))
    (folder,) = [p.parent for p in (tmp_path / "reports").glob("*/results.parquet")]
    df = pd.read_parquet(folder / "results.parquet")
    assert len(df) == 303 and set(df["outcome"]) == {"skipped"}
    reasons = df.groupby("strategy")["error"].agg(lambda e: sorted(set(e)))
    assert reasons["single"] == ["dry run (plan.dry_run: true): the cell's tasks ran, its trainer did not"]
    assert [r[:16] for r in reasons["ddp"] + reasons["fsdp"]] == ["needs 64 cores (", "needs 64 cores ("]
    assert not list(folder.glob("cells/*/train.log"))  # no trainer started


def _cpu_s() -> float:
    import resource

    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in used)


@pytest.mark.slow  # reads the model's facts in a subprocess (torch, transformers: seconds)
def test_start_plans_1000_cells_in_under_10_s(tmp_path, monkeypatch):
    from steps.flow import tasks

    monkeypatch.setenv("FINETUNE_MATRIX_REPORTS", str(tmp_path / "reports"))
    matrix = parse_matrix({"name": "k", "models": "llama-debug", "peft": ["lora", "full"],
                           "strategy": ["single", "ddp"], "gpus": 2, "lr": [1e-5 * (i + 1) for i in range(250)],
                           "micro_batch": 4, "seq_len": 32, "train": {"max_steps": 5}}).model_dump(mode="json")
    # CPU seconds, this process's and the facts subprocess's: on a quiet machine the wall time,
    # and what the other test worker's ranks cannot stretch (they doubled the wall time)
    start = _cpu_s()
    cells, skipped, _ = tasks.plan(matrix, "r1")
    took = _cpu_s() - start
    assert len(cells) == 1000 and not skipped
    assert took < 10, f"planned 1,000 cells in {took:.1f} CPU seconds"
    plan = pd.read_csv(tmp_path / "reports" / "r1" / "plan.csv")
    assert len(plan) == 1000
