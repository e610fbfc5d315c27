"""What the trainer measures about its device and model: peak memory, device name, FLOPs."""

from __future__ import annotations

import os
import platform
import resource
from typing import Any

import torch

from steps.estimate import params


def peak_memory_gb(device: torch.device) -> float:
    """GPU: max allocated by the caching allocator; CPU: the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def runtime_gb(device: torch.device, libraries: tuple[str, ...] = ("transformers", "peft")) -> float:
    """What the process holds before any model: GPU, CUDA's allocated bytes (the context is not
    in them, as it is not in the peak); CPU, the resident set once the cell's libraries are
    imported (interpreter, torch, the process group, `libraries`): the baseline the memory
    model's estimate is compared on top of."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e9
    import importlib

    import psutil

    for name in libraries:
        importlib.import_module(name)
    return psutil.Process().memory_info().rss / 1e9


def peak_reserved_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / 1e9 if device.type == "cuda" else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def flops_per_token(model_config: Any, trainable: int, frozen: int, embedding: int,
                    seq_len: float, full: bool) -> float:
    """Training FLOPs per token of a loaded model (`steps.estimate.params.flops_per_token`)."""
    layers = getattr(model_config, "num_hidden_layers", 0)
    heads = getattr(model_config, "num_attention_heads", 0)
    hidden = getattr(model_config, "hidden_size", 0)
    head_dim = getattr(model_config, "head_dim", None) or (hidden // heads if heads else 0)
    return params.flops_per_token(layers, heads, head_dim, trainable, frozen, embedding, seq_len, full)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock read next times it (CUDA runs
    kernels asynchronously: without this a step's time is the time to queue it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuSampler:
    """This rank's GPU as NVML sees it, sampled on a thread while the timed steps run: mean
    utilisation (the share of time a kernel was running) and the most memory in use (the whole
    process: CUDA context, caching allocator, NCCL buffers, which PyTorch's own peak leaves out).

    Where there is no CUDA device or no NVML (`nvidia-ml-py`), it measures nothing and reports
    None, so CPU runs carry no invented numbers."""

    def __init__(self, device: torch.device, every_s: float = 0.1):
        self.every_s, self.util, self.used = every_s, [], []
        self._handle, self._thread, self._stop = None, None, None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            self._nvml = pynvml
        except Exception as exc:  # noqa: BLE001 - no NVML library or driver: measure nothing
            print(f"GPU utilisation not measured: {type(exc).__name__}: {exc}", flush=True)
            self._handle = None

    def sample(self) -> None:
        rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        self.util.append(float(rates.gpu))
        self.used.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 1e9)

    def start(self) -> None:
        """Begin sampling (again) on a thread; a no-op without NVML or when already sampling."""
        if self._handle is None or self._thread is not None:
            return
        import threading

        self._stop = threading.Event()

        def run() -> None:  # a sample at once, so that even a few short steps are seen
            self.sample()
            while not self._stop.wait(self.every_s):
                self.sample()

        self._thread = threading.Thread(target=run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.sample()  # the end of the stretch (NVML's utilisation covers its last sample period)

    @property
    def mean_util_pct(self) -> float | None:
        return sum(self.util) / len(self.util) if self.util else None

    @property
    def max_used_gb(self) -> float | None:
        return max(self.used) if self.used else None
