"""`train.lora_kernels` against PEFT: the debug Llama built by the trainer's own modeling code,
once with PEFT's modules as they are and once routed through the kernels, one forward and
backward on the same tokens (and, with dropout, from the same random state: the kernels draw
PEFT's masks). In fp32 the loss and every adapter gradient equal PEFT's within 1e-5 relative
(the largest difference over the largest value, per tensor); under bf16 autocast, where the two
round in different places, within the stated bf16 tolerance.

Where the kernels cannot serve a cell it is not refused: it runs PEFT's modules, is planned so,
and its results row says why (`lora_kernels_off`)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from steps.plan import catalog, compat
from steps.plan import lora_kernels as where
from steps.trainer import lora_kernels, modeling
from steps.trainer.engines.base import autocast, token_loss_sum
from tests.conftest import make_cell

ARCH = catalog.model_presets()["llama-debug"].config
EVERY = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FP32 = 1e-5
BF16 = 2e-2  # bf16 sums the gradient of a shared input in another order (measured: 1.15% at worst)


def _cell(peft="lora", precision="fp32", targets=EVERY, dropout=0.0, **train):
    lora = {"r": 8, "alpha": 16, "target_modules": targets, "dropout": dropout}
    return make_cell(peft=peft, precision=precision, micro_batch=2, seq_len=48,
                     train={"init": "random", "lora": lora, "lora_kernels": "false", **train})  # _run routes


def _run(cell, kernels: bool, training: bool = True):
    """Loss and adapter gradients of one forward and backward; the kernels' counts. Dropout's
    masks come from the global random state, seeded alike before each forward."""
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    with torch.no_grad():  # PEFT starts lora_B at zero, where lora_A's gradient and x's through B are zero
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    counts = lora_kernels.apply(model) if kernels else None
    model.train(training)
    torch.manual_seed(1234)
    ids = torch.randint(0, ARCH["vocab_size"], (cell.micro_batch, cell.seq_len), generator=torch.Generator().manual_seed(0))
    with autocast(cell, torch.device("cpu")):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = token_loss_sum(logits, ids) / ids.numel()
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach().float(), grads, counts


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    errors = {n: ((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)).item() for n in a}
    name = max(errors, key=errors.get)
    return name, errors[name]


@pytest.mark.parametrize("dropout", [0.0, 0.05])
@pytest.mark.parametrize(("peft", "precision", "tolerance"), [
    ("lora", "fp32", FP32), ("qlora", "fp32", FP32), ("lora", "bf16-mixed", BF16), ("qlora", "bf16-mixed", BF16),
    ("lora", "bf16-true", BF16)])
def test_losses_and_every_gradient_are_peft_s(peft, precision, tolerance, dropout):
    cell = _cell(peft, precision, dropout=dropout)
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    layers = ARCH["num_hidden_layers"]
    assert counts == {"mlp": layers, "linear": len(EVERY) * layers}
    assert sorted(fast_grads) == sorted(grads) and len(grads) == 2 * len(EVERY) * layers
    assert abs(fast_loss - loss) / loss <= tolerance, (fast_loss, loss)
    name, worst = _worst(grads, fast_grads)
    assert worst <= tolerance, f"{name}: {worst:.2e}"


def test_only_the_attention_adapted_runs_each_projection_through_its_kernel():
    cell = _cell(targets=["q_proj", "v_proj"])
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    assert counts == {"mlp": 0, "linear": 2 * ARCH["num_hidden_layers"]}
    assert abs(fast_loss - loss) / loss <= FP32
    assert _worst(grads, fast_grads)[1] <= FP32


def test_the_trainer_routes_a_cell_with_lora_kernels_through_them():
    cell = _cell(lora_kernels=True)
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    mlp = model.base_model.model.model.layers[0].mlp
    assert mlp.forward.__func__ is lora_kernels._mlp_forward
    assert mlp.gate_proj.forward.__func__ is lora_kernels._linear_forward


def test_dropout_draws_a_mask_and_evaluation_drops_nothing():
    """The dropout cases above compare runs that dropped something: 0.05 moves the loss 60 times
    the fp32 tolerance and an adapter gradient by half (measured: 6.0e-4, 0.55), far beyond
    the bf16 tolerance too. In evaluation nothing is dropped: the loss is dropout 0's exactly."""
    (dropped, dropped_grads, _), (plain, plain_grads, _) = (_run(_cell(dropout=p), kernels=True) for p in (0.05, 0.0))
    assert abs(dropped - plain) / plain > 50 * FP32, (dropped, plain)
    assert _worst(plain_grads, dropped_grads)[1] > 10 * BF16
    evaluated, evaluated_plain = (_run(_cell(dropout=p), kernels=True, training=False)[0] for p in (0.05, 0.0))
    assert evaluated == evaluated_plain


OFF = {
    "full": "full fine-tuning has no LoRA adapters",
    "dora": "dora is not plain LoRA: its magnitude rescales each output",
    "tensor": "tensor parallelism (tensor) splits the adapted projections across ranks",
    "hybrid-tensor": "tensor parallelism (hybrid) splits the adapted projections across ranks",
    "zero3": "zero3 gathers a module's weights as the module is called, and the kernels read them without calling it",
    "zero3_offload": "zero3_offload gathers a module's weights as the module is called, and the kernels read them "
                     "without calling it",
    "compile": "train.compile: layers traces PEFT's own ops",
}
SETTINGS = {
    "full": {"peft": "full"}, "dora": {"peft": "dora"}, "tensor": {"strategy": "tensor", "gpus": 2},
    "hybrid-tensor": {"strategy": "hybrid", "gpus": 4,
                      "train": {"parallel": {"hybrid_inner": "tensor", "model_parallel": 2}}},
    "zero3": {"strategy": "zero3", "gpus": 2}, "zero3_offload": {"strategy": "zero3_offload", "gpus": 2},
    "compile": {"train": {"compile": "layers"}},
}


@pytest.mark.parametrize("case", list(OFF))
def test_a_cell_the_kernels_cannot_serve_runs_without_them_and_says_why(case):
    settings = dict(SETTINGS[case])
    train = {"lora_kernels": True, **settings.pop("train", {})}
    cell = make_cell(**settings, train=train)
    assert compat.refusal(cell) is None
    assert where.off_reason(cell) == OFF[case] and not where.applies(cell)
    off, auto = (cell.model_copy(update={"train": cell.train.model_copy(update={"lora_kernels": v})})
                 for v in ("false", "auto"))
    assert where.off_reason(off) is None  # not asked for: nothing to say
    # the default asks only of LoRA and QLoRA cells: a full or DoRA cell has nothing to say
    assert where.off_reason(auto) == (None if case in ("full", "dora") else OFF[case]) and not where.applies(auto)


def test_by_default_the_kernels_serve_lora_and_qlora_and_nothing_else():
    for peft in ("lora", "qlora"):
        cell = make_cell(peft=peft)
        assert cell.train.lora_kernels == "auto" and where.applies(cell) and where.off_reason(cell) is None
    for peft in ("full", "dora"):
        cell = make_cell(peft=peft)
        assert not where.applies(cell) and where.off_reason(cell) is None
    # a model whose adapted layers are not bias-free Linear layers (its facts) keeps PEFT's modules
    odd = {"c_attn": "Conv1D with a bias"}
    assert not where.applies(make_cell(), odd)
    assert where.off_reason(make_cell(), odd, "gpt2") == (
        "the kernels compute LoRA on bias-free Linear layers and gpt2's c_attn (Conv1D with a bias) is not")
    # written out as booleans (YAML, older results rows), the setting reads as its words
    assert make_cell(train={"lora_kernels": True}).train.lora_kernels == "true"
    assert [where.setting(v) for v in (True, False, None, float("nan"), "auto")] == [
        "true", "false", "false", "false", "auto"]


@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp", "zero1", "zero2", "pipeline", "hybrid"])
def test_the_kernels_run_under_every_strategy_that_keeps_modules_whole(strategy):
    for peft in ("lora", "qlora"):
        cell = make_cell(peft=peft, strategy=strategy, gpus=4 if strategy == "hybrid" else 2,
                         train={"lora_kernels": True, "lora": {"dropout": 0.05}})
        assert compat.refusal(cell) is None and where.applies(cell) and where.off_reason(cell) is None


def test_the_trainer_leaves_a_dora_cell_to_peft():
    cell = _cell("dora", lora_kernels=True)
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    mlp = model.base_model.model.model.layers[0].mlp
    assert getattr(model, "lora_kernels", None) is None
    assert getattr(mlp.forward, "__func__", None) is not lora_kernels._mlp_forward


def test_applying_again_routes_nothing_twice():
    """As after Liger Kernel patched the MLPs: an MLP whose forward was replaced is routed again,
    and no layer wraps the kernels' own forward."""
    cell = _cell()
    loss, grads, counts = _run(cell, kernels=True)
    model = modeling.apply_peft(modeling.load_model(cell, ARCH["vocab_size"], torch.device("cpu")), cell)
    first = lora_kernels.apply(model)
    mlp = model.base_model.model.model.layers[0].mlp
    mlp.forward = mlp._plain_forward  # what Liger's patch does: the MLP's own forward back in place
    assert lora_kernels.apply(model) == first == counts
    assert mlp.forward.__func__ is lora_kernels._mlp_forward
    assert mlp.gate_proj._peft_forward.__func__ is not lora_kernels._linear_forward


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_under_activation_checkpointing_the_gradients_are_peft_s(dropout):
    """Checkpointing runs each layer's forward again in backward: the kernels' functions too,
    drawing the same masks again (checkpointing restores the random state)."""
    cell = _cell(gradient_checkpointing=True, dropout=dropout)
    loss, grads, _ = _run(cell, kernels=False)
    fast_loss, fast_grads, counts = _run(cell, kernels=True)
    assert counts == {"mlp": ARCH["num_hidden_layers"], "linear": len(EVERY) * ARCH["num_hidden_layers"]}
    assert abs(fast_loss - loss) / loss <= FP32
    assert _worst(grads, fast_grads)[1] <= FP32


# ---------------------------------------------------------------- a matrix that sets them everywhere
MATRIX = """
name: kernels-everywhere
models: [tinyllama-1.1b]
peft: [full, lora, qlora, dora]
strategy: [single, zero3, tensor]
instance: p4d.24xlarge
gpus: 2
lr: 1.0e-4
micro_batch: 4
precision: bf16-mixed
seq_len: 1024
train: {max_steps: 10, lora_kernels: true, lora: {target_modules: all-linear}}
sweep: {train.lora.dropout: [0.0, 0.05]}
exclude:
  - {peft: full, train.lora.dropout: 0.05}
  - {strategy: tensor, peft: qlora}
  - {strategy: tensor, peft: dora}
"""


def test_a_matrix_that_sets_the_kernels_plans_every_cell_as_it_will_run():
    """Full, LoRA (dropout 0 and 0.05), QLoRA and DoRA under single, zero3 and tensor: none is
    refused; each cell's activations are planned with the kernels where they run and as PEFT's
    where they do not (the same as the cell without the setting), and its time calibration key
    names them only where they run."""
    from steps.estimate import calibrate, planner
    from steps.plan.matrix import expand, parse_matrix

    planned = expand(parse_matrix(yaml.safe_load(MATRIX)))
    assert len(planned) == 17 and [p.refused for p in planned if p.refused] == []
    seen = {}
    for p in planned:
        cell = p.cell
        without = cell.model_copy(update={"train": cell.train.model_copy(update={"lora_kernels": "false"})})
        gb, gb_without = (planner.predict(c).memory_gb["activations"] for c in (cell, without))
        assert (gb < gb_without) if where.applies(cell) else (gb == gb_without), cell.cell_id
        assert ("lora_kernels" in calibrate._keys(cell)[1]) == where.applies(cell)
        seen[(cell.peft, cell.strategy, cell.train.lora.dropout)] = (where.off_reason(cell), round(gb, 2),
                                                                    round(gb_without, 2))
    # (peft, strategy, dropout): why the kernels do not run (None: they do), activations GB per
    # rank as planned, and as planned without the setting
    zero3, tensor = OFF["zero3"], OFF["tensor"]
    assert seen == {
        ("full", "single", 0.0): (OFF["full"], 14.45, 14.45), ("full", "zero3", 0.0): (OFF["full"], 10.52, 10.52),
        ("full", "tensor", 0.0): (OFF["full"], 7.22, 7.22),
        ("lora", "single", 0.0): (None, 7.68, 9.73), ("lora", "single", 0.05): (None, 9.3, 14.58),
        ("lora", "zero3", 0.0): (zero3, 9.72, 9.72), ("lora", "zero3", 0.05): (zero3, 14.57, 14.57),
        ("lora", "tensor", 0.0): (tensor, 4.87, 4.87), ("lora", "tensor", 0.05): (tensor, 7.29, 7.29),
        ("qlora", "single", 0.0): (None, 7.68, 9.73), ("qlora", "single", 0.05): (None, 9.3, 14.58),
        ("qlora", "zero3", 0.0): (zero3, 9.72, 9.72), ("qlora", "zero3", 0.05): (zero3, 14.57, 14.57),
        ("dora", "single", 0.0): (OFF["dora"], 17.44, 17.44), ("dora", "single", 0.05): (OFF["dora"], 22.29, 22.29),
        ("dora", "zero3", 0.0): (OFF["dora"], 17.43, 17.43), ("dora", "zero3", 0.05): (OFF["dora"], 22.28, 22.28),
    }


# ---------------------------------------------------------------- trained, and what the row says
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Four cells of a matrix that sets the kernels, trained by one launch (6 steps, fp32): LoRA
    with dropout 0.05 through them, the same cell on PEFT's modules, and DoRA and full
    fine-tuning, which they cannot serve. Their results rows, by name."""
    from steps.results import table
    from tests.conftest import torchrun_cells

    train = {"lora_kernels": True, "save_adapter": False, "lora": {"dropout": 0.05, "target_modules": "all-linear"}}
    cells = {"kernels": make_cell(train=train), "peft": make_cell(train={**train, "lora_kernels": False}),
             "dora": make_cell(peft="dora", train=train), "full": make_cell(peft="full", train=train)}
    root = tmp_path_factory.mktemp("kernels")
    proc, found = torchrun_cells(list(cells.values()), [root / name for name in cells])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: table.row("kernels-run", cell.model_dump(mode="json"), m)
            for (name, cell), m in zip(cells.items(), found, strict=True)}


@pytest.mark.slow  # one launch of four cells (torchrun, 6 steps): seconds
def test_the_row_says_what_ran_through_the_kernels_and_why_not(trained):
    layers = ARCH["num_hidden_layers"]
    assert [trained[n]["outcome"] for n in ("kernels", "peft", "dora", "full")] == ["ok"] * 4
    assert (trained["kernels"]["lora_kernels"], trained["kernels"]["lora_kernels_off"]) == (
        {"mlp": layers, "linear": 7 * layers}, None)
    assert (trained["peft"]["lora_kernels"], trained["peft"]["lora_kernels_off"]) == (None, None)
    assert (trained["dora"]["lora_kernels"], trained["dora"]["lora_kernels_off"]) == (None, OFF["dora"])
    assert (trained["full"]["lora_kernels"], trained["full"]["lora_kernels_off"]) == (None, OFF["full"])
    assert trained["dora"]["train.lora_kernels"] == trained["full"]["train.lora_kernels"] == "true"


@pytest.mark.slow
def test_with_dropout_the_kernels_train_to_peft_s_losses(trained):
    """Six steps with dropout 0.05: the kernels draw PEFT's masks step after step, so the losses
    are PEFT's (what lets `steps.plan.equivalence` leave lora_kernels out of the class)."""
    losses, reference = (json.loads(trained[n]["loss_curve"]) for n in ("kernels", "peft"))
    assert len(losses) == len(reference) == 6
    for got, want in zip(losses, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert trained["kernels"]["val_loss"] == pytest.approx(trained["peft"]["val_loss"], rel=1e-5)
