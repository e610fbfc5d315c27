"""What the trainer measures about its device and model: peak memory, device name, FLOPs, and
the machine's other work while it trains."""

from __future__ import annotations

import os
import platform
import resource
import time
from typing import Any

import torch

from steps.estimate import params
from steps.results.metrics import LAUNCHER_PID_ENV


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


def _cores_jiffies(cores: set[int]) -> tuple[int, int]:
    """(busy, all) jiffies of `cores` since boot, from /proc/stat: busy is user, nice, system,
    irq, softirq and steal; idle and iowait are not (guest time is inside user already)."""
    busy = total = 0
    with open("/proc/stat", encoding="ascii") as fh:
        for line in fh:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
                continue
            v = [int(x) for x in values[:8]]
            total += sum(v)
            busy += sum(v) - v[3] - v[4]
    return busy, total


def _processes() -> dict[int, tuple[int, int]]:
    """(parent pid, user + system jiffies of all its threads) of every live process, by pid."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                text = fh.read()
        except OSError:  # gone since the listing
            continue
        fields = text[text.rindex(b")") + 2:].split()  # from field 3 (state): the name may hold spaces
        out[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def cell_root() -> int:
    """The process at the top of this cell's process tree: the one the launcher started (torchrun,
    DeepSpeed's launcher or the trainer itself). torchrun puts each rank in a session of its own,
    so a session is not the cell; the tree under that process is. Without the launcher (a
    trainer started by hand), torchrun's agent where there is one, else this process."""
    launcher = int(os.environ.get(LAUNCHER_PID_ENV) or 0)
    if not launcher:
        return os.getppid() if os.environ.get("TORCHELASTIC_RUN_ID") else os.getpid()
    try:
        parents = _processes()
    except OSError:  # no /proc: only the load average is measured
        return os.getpid()
    pid = os.getpid()
    while pid in parents and parents[pid][0] not in (launcher, 0, 1):
        pid = parents[pid][0]
    return pid


def _tree_jiffies(root: int) -> dict[int, int]:
    """User + system jiffies of each live process of the tree under `root` (itself included, all
    their threads), by pid: the cell's processes."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in procs and pid not in out:
            out[pid] = procs[pid][1]
            todo += children.get(pid, [])
    return out


class MachineLoad:
    """How busy the machine was with other work while the timed steps ran: the 1-minute load
    average at the start and the end, and `other_cpu_share`, the share of the cell's cores (its
    CPU affinity: the cores the launcher pinned it to, the whole host where it is not pinned)
    that processes outside the cell used. That is the cores' busy time (/proc/stat) minus the
    CPU time of the cell's own processes (`cell_root`'s tree: torchrun, every rank, their threads),
    over the cores' whole time. Two reads of /proc, at `start` and `stop`, no thread.

    A process of the cell that ends inside the window loses its time to "other" (the share errs
    high, never hiding contention); one that starts inside it counts whole. Without /proc (not
    Linux), or over a window shorter than MIN_WINDOW_S, only the load average is measured."""

    MIN_WINDOW_S = 1.0
    """The kernel counts CPU time in ticks (100 a second): over a shorter window a share would be
    a handful of ticks, its error tens of percent."""

    def __init__(self, cores: set[int] | None = None, root: int | None = None):
        if cores is None:  # not Linux: every core (no /proc either: only the load average is read)
            cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
        self.cores = set(cores)
        self.root = root  # the cell's process tree, found when the window opens (`cell_root`)
        self.load_start = self.load_end = self.other_share = self.busy_share = self.own_share = None
        self._at_start: tuple[tuple[int, int], dict[int, int]] | None = None
        self._t0 = 0.0

    def _read(self) -> tuple[tuple[int, int], dict[int, int]] | None:
        try:
            return _cores_jiffies(self.cores), _tree_jiffies(self.root)
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        """Open the window (once: later calls are no-ops)."""
        if self.load_start is None:
            self.load_start = os.getloadavg()[0]
            if self.root is None:  # here, not at construction: every rank builds one, rank 0 opens it
                self.root = cell_root()
            self._at_start = self._read()
            self._t0 = time.monotonic()

    def stop(self) -> None:
        """Close the window (once) and work out the shares."""
        if self.load_start is None or self.load_end is not None:
            return
        self.load_end = os.getloadavg()[0]
        end = self._read()
        if self._at_start is None or end is None or time.monotonic() - self._t0 < self.MIN_WINDOW_S:
            return
        (busy0, all0), own0 = self._at_start
        (busy1, all1), own1 = end
        if all1 <= all0:
            return
        own = sum(t - own0.get(pid, 0) for pid, t in own1.items())
        self.busy_share = (busy1 - busy0) / (all1 - all0)
        self.own_share = own / (all1 - all0)
        self.other_share = min(1.0, max(0.0, self.busy_share - self.own_share))

    def fields(self) -> dict[str, float | None]:
        """The metrics this window fills (None where it was not measured)."""
        values = {"load_avg_start": self.load_start, "load_avg_end": self.load_end,
                  "other_cpu_share": self.other_share}
        return {k: None if v is None else round(v, 4) for k, v in values.items()}
