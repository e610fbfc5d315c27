"""The YAML catalogs under `configs/`: model presets and instance types."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from steps import CONFIGS_DIR
from steps.plan.schema import Strict, validate

MODELS_DIR = CONFIGS_DIR / "models"
INSTANCES_FILE = CONFIGS_DIR / "instances.yaml"


class ModelPreset(Strict):
    """A named architecture: `init: random` builds it from `config` with no download."""

    name: str
    description: str = ""
    init: Literal["random", "pretrained"] = "random"
    # Hub id or local directory of real weights, used when init is `pretrained`.
    source: str | None = None
    tokenizer: str = "byte"
    config: dict[str, Any] = Field(default_factory=dict)


class Instance(Strict):
    """One machine type: the facts MFU, memory checks, cost and remote resources come from."""

    name: str
    description: str = ""
    accelerator: str  # the device model, e.g. "NVIDIA A10G"; "cpu" for local-cpu
    devices_per_node: int = Field(ge=0)
    cores_per_device: int | None = Field(None, ge=1)  # local CPU types: cores per process
    memory_per_device_gb: float | None = None
    # Dense peak per device, from the vendor's datasheet (no sparsity); None where unpublished.
    peak_tflops_bf16: float | None = None
    peak_tflops_fp16: float | None = None
    peak_tflops_fp32: float | None = None
    bf16: bool = True
    interconnect: str = ""  # between the devices of one node
    network_gbps: float | None = None  # between nodes
    vcpus: int | None = Field(None, ge=1)
    memory_gb: float | None = Field(None, gt=0)
    price_per_hour_usd: float = Field(ge=0.0)  # on-demand, per instance-hour
    price_per: Literal["instance", "device"] = "instance"
    price_region: str | None = None
    price_date: str | None = None  # when the price was read (YYYY-MM)
    sagemaker_instance: str | None = None  # the `ml.` name, where SageMaker offers it
    # SageMaker training's on-demand price per instance-hour (its own rate, above EC2's), in
    # price_region; None where SageMaker does not offer the type.
    sagemaker_price_per_hour_usd: float | None = Field(None, ge=0.0)
    source: str

    @property
    def local(self) -> bool:
        return self.accelerator == "cpu"


def _read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@functools.cache
def model_presets() -> dict[str, ModelPreset]:
    presets = {}
    for path in sorted(MODELS_DIR.glob("*.yaml")):
        data = {"name": path.stem, **(_read_yaml(path) or {})}
        presets[path.stem] = validate(ModelPreset, data, str(path))
    return presets


@functools.cache
def instances() -> dict[str, Instance]:
    raw = (_read_yaml(INSTANCES_FILE) or {}).get("instances", {})
    return {
        name: validate(Instance, {"name": name, **entry}, f"{INSTANCES_FILE}:{name}")
        for name, entry in raw.items()
    }


def model_reference_problem(name: str) -> str | None:
    """Why `name` names no model: not a preset, not a local directory, not a hub id."""
    if name in model_presets() or Path(name).is_dir():
        return None
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return None  # a hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0
    return (
        f"{name!r} is not a model preset, a local directory or a hub id; presets: "
        f"{', '.join(model_presets())}"
    )


def peak_tflops(instance: str, precision: str) -> float | None:
    """Per-device peak for the precision the matmuls run in (fp32 cells use the fp32 peak)."""
    entry = instances().get(instance)
    if entry is None:
        return None
    if precision == "fp32":
        return entry.peak_tflops_fp32
    return entry.peak_tflops_fp16 if precision.startswith("fp16") else entry.peak_tflops_bf16


def cost_usd(instance: str, seconds: float | None, nodes: int, world_size: int) -> float | None:
    """What `seconds` of the cell cost: a GPU cell pays for its whole nodes; a local CPU cell
    for the cores it held (`price_per: device`). None for an instance not in the catalog."""
    entry = instances().get(instance)
    if entry is None or seconds is None:
        return None
    units = world_size if entry.price_per == "device" else nodes
    return seconds / 3600 * entry.price_per_hour_usd * units
