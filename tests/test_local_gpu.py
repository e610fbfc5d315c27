"""`local-gpu`: this machine's GPUs, with the catalog's figures for that GPU (no torch, no GPU
needed: FINETUNE_MATRIX_GPUS stands in for nvidia-smi, as it does to plan for another machine)."""

from __future__ import annotations

import pytest

from steps.plan import catalog, preflight
from steps.plan.matrix import expand, parse_matrix


@pytest.fixture
def gpus(monkeypatch):
    """Set what nvidia-smi would report; the catalog is read again, and again after the test."""

    def set_to(value: str) -> catalog.Instance:
        monkeypatch.setenv("FINETUNE_MATRIX_GPUS", value)
        catalog.local_gpus.cache_clear()
        catalog.instances.cache_clear()
        return catalog.instances()["local-gpu"]

    yield set_to
    monkeypatch.delenv("FINETUNE_MATRIX_GPUS")
    catalog.local_gpus.cache_clear()
    catalog.instances.cache_clear()


@pytest.mark.parametrize("reported,peak_bf16,peak_fp16,memory,per_gpu_hour", [
    ("NVIDIA H100 80GB HBM3:85.0", 989.5, 989.5, 80.0, 55.04 / 8),
    ("NVIDIA H200:150.1", 989.5, 989.5, 141.0, 43.26 / 8),
    ("NVIDIA A100-SXM4-40GB:42.5", 312.0, 312.0, 40.0, 21.957642 / 8),
    ("NVIDIA A100-SXM4-80GB:85.1", 312.0, 312.0, 80.0, 27.44705 / 8),
    ("NVIDIA A10G:24.1", None, None, 24.0, None),
    ("NVIDIA L4:24.0", None, None, 24.0, None),
    ("Tesla V100-SXM2-16GB:17.2", None, 125.0, 16.0, None),
], ids=["h100", "h200", "a100-40", "a100-80", "a10g", "l4", "v100"])
def test_local_gpu_takes_the_figures_of_the_catalog_entry_with_that_gpu(gpus, reported, peak_bf16, peak_fp16,
                                                                         memory, per_gpu_hour):
    entry = gpus(reported + "," + reported)
    name = reported.rpartition(":")[0]
    family = catalog.gpu_family(name)
    same = [e for e in catalog.instances().values() if e.name != "local-gpu" and e.devices_per_node
            and catalog.gpu_family(e.accelerator) == family]
    assert same, f"no catalog entry with {family}"
    assert entry.accelerator == name and entry.devices_per_node == 2 and entry.price_per == "device"
    assert entry.memory_per_device_gb == memory
    if peak_fp16 is not None:
        assert entry.peak_tflops_fp16 == peak_fp16 and entry.peak_tflops_bf16 == peak_bf16
    else:  # the catalog's own figures for that GPU, whichever entry carries them
        assert entry.peak_tflops_bf16 == same[0].peak_tflops_bf16 and entry.peak_tflops_bf16
    if per_gpu_hour is not None:
        assert entry.price_per_hour_usd == pytest.approx(per_gpu_hour)
    cheapest = min(e.price_per_hour_usd / e.devices_per_node for e in same
                   if e.memory_per_device_gb == entry.memory_per_device_gb)
    assert entry.price_per_hour_usd == pytest.approx(cheapest)
    assert catalog.cost_usd("local-gpu", 3600, nodes=1, world_size=2) == pytest.approx(2 * cheapest)
    if family == "V100":
        assert entry.bf16 is False  # bf16 cells are refused, as on p3
    # TF32 where the GPU has it (Ampere and later): the same peak as the catalog's entry
    assert entry.peak_tflops_tf32 == same[0].peak_tflops_tf32 and (entry.peak_tflops_tf32 is None) == (family == "V100")


def test_local_gpu_without_a_gpu_fails_the_plan_and_cells_beyond_its_gpus_are_skipped(gpus):
    assert gpus("").devices_per_node == 0
    matrix = {"name": "g", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"],
              "gpus": 2, "lr": 1e-3, "instance": "local-gpu"}
    spec = parse_matrix(matrix)
    assert preflight.machine_problems(spec, {"gpus": []}) == [
        "instance: local-gpu trains on this machine's NVIDIA GPUs, and nvidia-smi finds none; use instance: "
        "local-cpu (or instance: local, which picks) to train on the CPU"]
    gpus("NVIDIA L4:24.0")
    spec = parse_matrix(matrix)
    assert preflight.machine_problems(spec, {"gpus": ["NVIDIA L4"]}) == []
    refused = {p.cell.strategy: p.refused for p in expand(spec)}
    assert refused == {"single": None, "ddp": "needs 2 GPUs on this machine, which has 1 (NVIDIA L4)"}
    gpus("NVIDIA L4:24.0,NVIDIA L4:24.0")
    assert {p.refused for p in expand(parse_matrix(matrix))} == {None}


def test_instance_local_is_the_gpu_where_there_is_one(gpus):
    matrix = {"name": "g", "models": "llama-debug", "peft": "lora", "strategy": "single", "lr": 1e-3,
              "instance": "local", "include": [{"strategy": "ddp", "instance": ["local", "local-cpu"]}]}
    gpus("NVIDIA H100 80GB HBM3:85.0")
    spec = parse_matrix(matrix)
    assert spec.instance == ["local-gpu"] and spec.include[0].instance == ["local-gpu", "local-cpu"]
    gpus("")
    spec = parse_matrix(matrix)
    assert spec.instance == ["local-cpu"] and spec.include[0].instance == ["local-cpu"]


def test_an_unknown_gpu_has_no_peak_rather_than_a_wrong_one(gpus):
    entry = gpus("NVIDIA RTX PRO 6000 Blackwell:102.0")
    assert entry.accelerator == "NVIDIA RTX PRO 6000 Blackwell" and entry.devices_per_node == 1
    assert entry.peak_tflops_bf16 is None and catalog.peak_tflops("local-gpu", "bf16-mixed") is None
