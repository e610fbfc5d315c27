"""The YAML catalogs under `configs/`: model presets and instance types."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from steps import CONFIGS_DIR
from steps.plan.schema import Strict, validate

MODELS_DIR = CONFIGS_DIR / "models"
INSTANCES_FILE = CONFIGS_DIR / "instances.yaml"
LOCAL_GPU = "local-gpu"
# GPU families by the names drivers report ("NVIDIA H100 80GB HBM3", "Tesla V100-SXM2-16GB"),
# longest first so that "A10G" is not read as "A10" and "L40S" not as "L4".
GPU_FAMILIES = ("GH200", "H200", "H100", "A100", "A10G", "L40S", "L4", "V100", "T4")


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
    # fp32 matmuls on TF32 tensor cores (Ampere and later); None: the device has no TF32.
    peak_tflops_tf32: float | None = None
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
        """Runs on this machine's CPU (its cores are the devices)."""
        return self.accelerator == "cpu"

    @property
    def local_gpu(self) -> bool:
        """This machine's GPUs (`local-gpu`), whatever their model."""
        return self.name == LOCAL_GPU


# How a local CPU cell's processes allocate (the launcher's environment, and the probe's, which
# must time steps as the cells will run them). glibc raises its mmap threshold to the size of
# each large block freed (up to 32 MB), so the whole model a rank loads before sharding, and
# every step's activations, come back from the heap and stay in the resident set after they are
# freed: an FSDP rank's peak looked twice its live memory. A fixed threshold keeps large blocks in
# mmap, returned to the system when freed, so a CPU cell's peak resident set (and its
# `memory_cap_gb`) is the memory it needs; each step then maps its activations afresh, which
# costs time the probe has to see.
CPU_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def cores_per_rank(instance: Instance | None = None) -> int:
    """Cores one rank of a local CPU cell holds: the instance's `cores_per_device`, else
    FINETUNE_MATRIX_CORES_PER_RANK (default 1)."""
    if instance is not None and instance.cores_per_device:
        return instance.cores_per_device
    return max(1, int(os.environ.get("FINETUNE_MATRIX_CORES_PER_RANK", "1")))


def local_cores() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def random_init(cell: Any) -> bool:
    """Whether a cell's model gets random weights: `train.init`, or its preset's default."""
    if cell.train.init != "auto":
        return cell.train.init == "random"
    preset = model_presets().get(cell.model)
    return preset is not None and preset.init == "random"


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
    found = {
        name: validate(Instance, {"name": name, **entry}, f"{INSTANCES_FILE}:{name}")
        for name, entry in raw.items()
    }
    if LOCAL_GPU in found:
        found[LOCAL_GPU] = local_gpu_instance(found[LOCAL_GPU], found, tuple(local_gpus()))
    return found


@functools.cache
def local_gpus() -> list[tuple[str, float]]:
    """This machine's NVIDIA GPUs as (name, memory GB), from `nvidia-smi` (no torch, no CUDA
    context); [] where there is none or no driver. FINETUNE_MATRIX_GPUS="NAME:GB,..." stands in
    for nvidia-smi (to plan for a machine from another)."""
    import subprocess

    stand_in = os.environ.get("FINETUNE_MATRIX_GPUS")
    if stand_in is not None:
        return [(n.strip(), float(gb)) for n, _, gb in (x.rpartition(":") for x in stand_in.split(",") if x)]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [(name.strip(), float(mib) * 2**20 / 1e9) for name, mib in
            (line.rsplit(",", 1) for line in out.splitlines() if "," in line)]


def gpu_family(name: str) -> str | None:
    """"H100" for "NVIDIA H100 80GB HBM3" or "NVIDIA H100-SXM5-80GB"; None if not one we know."""
    words = name.upper().replace("-", " ").split()
    return next((f for f in GPU_FAMILIES if f in words), None)


def local_gpu_instance(entry: Instance, catalog: dict[str, Instance],
                       gpus: tuple[tuple[str, float], ...]) -> Instance:
    """`local-gpu` as the GPUs found here: the peaks and memory of the catalog entry with the
    same GPU (the nearest memory size within the family: A100 40 vs 80 GB), and as its price a
    per-GPU share of that entry's (a reference for comparing cells, not a bill). Without a GPU,
    or with one the catalog does not know, it has no devices or no peak: the checks before
    launch refuse it, or MFU goes unreported, rather than being computed against a wrong peak."""
    if not gpus:
        return entry.model_copy(update={"accelerator": "none found", "devices_per_node": 0})
    name, memory = gpus[0]
    family = gpu_family(name)
    same = [e for e in catalog.values() if not e.local and e.devices_per_node and family
            and gpu_family(e.accelerator) == family]
    update: dict[str, Any] = {"accelerator": name, "devices_per_node": len(gpus), "memory_per_device_gb": memory,
                              "description": f"this machine's {len(gpus)} x {name}"}
    if same:
        ref = min(same, key=lambda e: (abs((e.memory_per_device_gb or 0) - memory), e.price_per_hour_usd
                                       / e.devices_per_node))
        update.update(peak_tflops_bf16=ref.peak_tflops_bf16, peak_tflops_fp16=ref.peak_tflops_fp16,
                      peak_tflops_fp32=ref.peak_tflops_fp32, peak_tflops_tf32=ref.peak_tflops_tf32,
                      bf16=ref.bf16, interconnect=ref.interconnect,
                      memory_per_device_gb=ref.memory_per_device_gb,
                      price_per_hour_usd=ref.price_per_hour_usd / ref.devices_per_node, price_per="device",
                      price_region=ref.price_region, price_date=ref.price_date,
                      source=f"{entry.source} Detected {name}; figures of {ref.name} ({ref.accelerator}).")
    return entry.model_copy(update=update)


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


def device_kind(instance: str) -> str:
    """"cpu" or "gpu": what a cell's ranks run on (a type the catalog does not know counts as a
    CPU)."""
    entry = instances().get(instance)
    return "cpu" if entry is None or entry.local else "gpu"


def peak_tflops(instance: str, precision: str, tf32: bool = False) -> float | None:
    """Per-device peak for the precision the matmuls run in: an fp32 cell's is the TF32 tensor
    cores' where its matmuls ran on them (`tf32`), else the CUDA cores' fp32 peak."""
    entry = instances().get(instance)
    if entry is None:
        return None
    if precision == "fp32":
        return entry.peak_tflops_tf32 if tf32 and entry.peak_tflops_tf32 else entry.peak_tflops_fp32
    return entry.peak_tflops_fp16 if precision.startswith("fp16") else entry.peak_tflops_bf16


def tf32(cell: Any) -> bool:
    """Whether the cell's fp32 matmuls are planned on TF32 tensor cores: `train.tf32` is auto or
    true and the instance's GPU has them (a TF32 peak in the catalog).

    `true` on a device without TF32 (V100, T4, a CPU) is not refused: it runs in full fp32 and
    its results row says `tf32` false. TF32 is a math mode, not something the cell needs to run,
    and train settings are shared by a matrix's instances: refusing would skip the V100 and CPU
    cells (a study's CPU twin) of a matrix that asks TF32 for its A100s. The trainer decides
    again from the device it finds (`steps.trainer.tf32`) and says so in the cell's log."""
    entry = instances().get(cell.instance)
    return cell.train.tf32 != "false" and entry is not None and entry.peak_tflops_tf32 is not None


def cost_usd(instance: str, seconds: float | None, nodes: int, world_size: int) -> float | None:
    """What `seconds` of the cell cost: a GPU cell pays for its whole nodes; a local CPU cell
    for the cores it held (`price_per: device`). None for an instance not in the catalog."""
    entry = instances().get(instance)
    if entry is None or seconds is None:
        return None
    units = world_size if entry.price_per == "device" else nodes
    return seconds / 3600 * entry.price_per_hour_usd * units
