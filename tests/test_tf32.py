"""`train.tf32`: the setting validated, fp32 cells planned against the TF32 peak where the GPU
has TF32 and the fp32 peak otherwise, TF32 splitting equivalence classes as it resolves, and the
trainer's flags (on a CPU: off; the GPU side is tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from steps.estimate import calibrate, matrix_plan, step_time
from steps.plan import catalog, compat, equivalence
from steps.plan.matrix import load_matrix
from steps.plan.schema import ConfigError, TrainSettings, validate
from steps.trainer import tf32
from steps.trainer.distributed import Dist
from tests.conftest import REPO, make_cell


def test_tf32_is_auto_true_or_false_and_yaml_booleans_are_its_words():
    assert TrainSettings().tf32 == "auto"
    assert [validate(TrainSettings, {"tf32": v}, "m").tf32 for v in (True, False, "true", "auto")] == [
        "true", "false", "true", "auto"]
    for bad in ("yes please", 1, None):
        with pytest.raises(ConfigError) as err:
            validate(TrainSettings, {"tf32": bad}, "matrix")
        assert str(err.value) == (f"matrix: 1 problem(s):\n  - tf32: {bad!r} is not allowed; allowed values: "
                                  f"'auto', 'true', 'false'")


@pytest.mark.parametrize("instance,tf32_peak,fp32_peak", [("p4d.24xlarge", 156.0, 19.5), ("p4de.24xlarge", 156.0, 19.5),
                                                          ("p5.48xlarge", 494.7, 67.0), ("p5e.48xlarge", 494.7, 67.0)])
def test_an_fp32_cell_is_planned_against_the_tf32_peak_unless_tf32_is_false(instance, tf32_peak, fp32_peak):
    peaks = {s: step_time.peak_tflops(make_cell(instance=instance, train={"tf32": s})) for s in ("auto", "true", "false")}
    assert peaks == {"auto": tf32_peak, "true": tf32_peak, "false": fp32_peak}
    # 16-bit cells keep their own peak whatever the setting
    assert step_time.peak_tflops(make_cell(instance=instance, precision="bf16-mixed", train={"tf32": "true"})) == \
        catalog.peak_tflops(instance, "bf16-mixed") > tf32_peak


def test_without_tf32_hardware_true_is_planned_in_full_fp32_and_not_refused():
    """A V100 has no TF32 and a CPU no peak at all: `true` is not a refusal, the cell is planned
    (and runs) in full fp32."""
    for setting in ("auto", "true"):
        cell = make_cell(instance="p3.2xlarge", train={"tf32": setting})
        assert not catalog.tf32(cell) and step_time.peak_tflops(cell) == 15.7
        assert compat.refusal(cell) is None
        assert not catalog.tf32(make_cell(train={"tf32": setting}))  # local-cpu


def test_study4_s_fp32_tinyllama_cell_on_an_a100_is_planned_on_tf32():
    """The study measured 7,646 tokens/s for full fine-tuning of TinyLlama in fp32 at micro-batch
    8 x 4 on one A100 80 GB: with TF32's peak (8x the CUDA cores') the plan's range holds it;
    with `tf32: false` it does not."""
    spec = load_matrix(REPO / "configs/matrix/study4-litgpt-memory.yaml")
    off = spec.model_copy(update={"train": spec.train.model_copy(update={"tf32": "false"})})
    speeds = {}
    for name, matrix in (("auto", spec), ("false", off)):
        planned, plan = matrix_plan.plan_spec(matrix, check="never", calibration=False, probe=False)
        (cell,) = [p.cell for p in planned if p.cell.precision == "fp32" and (p.cell.micro_batch, p.cell.grad_accum) == (8, 4)]
        speeds[name] = plan.plans[cell.cell_id]
    on, off_plan = speeds["auto"], speeds["false"]
    assert on.tokens_per_s == pytest.approx(8 * off_plan.tokens_per_s)  # 156 / 19.5 TFLOP/s, compute-bound
    assert round(on.tokens_per_s, -1) == 8420 and round(off_plan.tokens_per_s, -1) == 1050
    low, high = on.tokens_per_s_range
    assert low < 7646 < high and not off_plan.tokens_per_s_range[0] < 7646 < off_plan.tokens_per_s_range[1]


def test_the_calibration_fits_fp32_on_tf32_apart_from_fp32_on_cuda_cores():
    on, off = (calibrate._keys(make_cell(instance="p4de.24xlarge", train={"tf32": s})) for s in ("auto", "false"))
    assert on[2:] == ["A100|gpu|single|fp32+tf32|lora", "A100|gpu|single", "A100|gpu", "A100"]
    assert off[2] == "A100|gpu|single|fp32|lora"
    assert calibrate._keys(make_cell(train={"tf32": "true"}))[2] == "cpu|local-cpu|single|fp32|lora"


def test_tf32_splits_classes_as_it_resolves_on_the_instance():
    """auto and true on an A100 are one class, false another; on a V100 (no TF32) every setting
    is the A100's false; on a CPU every setting keeps the class name it had before the setting."""
    def klass(instance, setting):
        return equivalence.quality_class(make_cell(instance=instance, train={"tf32": setting}))

    a100 = {s: klass("p4de.24xlarge", s) for s in ("auto", "true", "false")}
    assert a100["auto"] == a100["true"] != a100["false"]
    assert {klass("p3.2xlarge", s) for s in ("auto", "true", "false")} == {a100["false"]}
    assert {klass("local-cpu", s) for s in ("auto", "true", "false")} == {"q-312f51ccda"}  # no TF32: a name without the setting


def test_on_a_cpu_the_trainer_keeps_full_fp32_and_says_when_true_was_asked(capsys):
    cpu = Dist(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
    assert tf32.apply(make_cell(), cpu) is False
    assert capsys.readouterr().err == ""
    assert tf32.apply(make_cell(train={"tf32": "true"}), cpu) is False
    assert capsys.readouterr().err == ("train.tf32 is true but the device (cpu) has no TF32 tensor cores (Ampere or "
                                       "later): fp32 matmuls run in full fp32\n")
    assert torch.get_float32_matmul_precision() == "highest" and torch.backends.cuda.matmul.allow_tf32 is False


def test_the_flags_agree_in_torch_s_old_and_new_views(monkeypatch):
    """Set through set_float32_matmul_precision, every reader agrees and none raises (setting a
    backend's `fp32_precision` makes `get_float32_matmul_precision()`, which inductor calls,
    raise in torch 2.13); turned off again for the next cell of the process."""
    monkeypatch.setattr(tf32, "device_has_tf32", lambda device: True)
    d = Dist(rank=0, local_rank=0, world=1, device=torch.device("cpu"))
    try:
        for setting, on in (("auto", True), ("false", False), ("true", True), ("auto", False)):
            if setting == "auto" and not on:
                monkeypatch.setattr(tf32, "device_has_tf32", lambda device: False)
            assert tf32.apply(make_cell(train={"tf32": setting}), d) is on
            views = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                     torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.allow_tf32)
            assert views == (("high", True, "tf32", True) if on else ("highest", False, "ieee", False))
    finally:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = True  # torch's default
