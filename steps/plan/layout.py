"""How a cell's ranks share the work: the one object every other part asks.

Built once from the strategy, the rank count and `train.parallel`; the schema (world size,
global batch), the refusal rules, the engines (which replica and stage a rank is), checkpoints
(DeepSpeed or not) and the memory budget (what is divided by what) all read it instead of
comparing strategy names themselves.

Ranks are laid out as a (data-parallel, model-parallel) grid, row by row: the ranks of one
model copy are consecutive, so that they sit on one node's fast links.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelSplit = Literal["tensor", "pipeline"]
Part = Literal["weights", "grads", "optim"]
PARTS: tuple[Part, ...] = ("weights", "grads", "optim")

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3, "zero3_offload": 3}
# What each data-parallel strategy divides among its replicas, and what it keeps on the CPU.
_DP_SHARDED: dict[str, frozenset[Part]] = {
    "fsdp": frozenset(PARTS), "zero3": frozenset(PARTS), "zero2": frozenset({"grads", "optim"}),
    "zero1": frozenset({"optim"}), "zero3_offload": frozenset({"grads"}),
}
_OFFLOADED: dict[str, frozenset[Part]] = {"zero3_offload": frozenset({"weights", "optim"})}


@dataclass(frozen=True)
class RankPlace:
    """Where one rank sits in the grid."""

    dp_rank: int  # which data-parallel replica it belongs to
    mp_rank: int  # its place within the replica (tensor shard or pipeline stage)
    reports: bool  # its loss and token counts go into the global sums (once per replica)


@dataclass(frozen=True)
class ParallelLayout:
    strategy: str
    world_size: int
    model_split: ModelSplit | None  # how one model copy is split over ranks, if it is
    mp_size: int  # ranks that hold one copy of the model between them

    @classmethod
    def of(cls, strategy: str, world_size: int, hybrid_inner: ModelSplit = "pipeline",
           model_parallel: int = 2) -> ParallelLayout:
        """`hybrid_inner` and `model_parallel` are `train.parallel`'s (read only by hybrid)."""
        if strategy in ("tensor", "pipeline"):
            return cls(strategy, world_size, strategy, world_size)
        if strategy == "hybrid":
            return cls(strategy, world_size, hybrid_inner, model_parallel)
        return cls(strategy, world_size, None, 1)

    @property
    def dp_size(self) -> int:
        """Model replicas, each fed its own slice of the global batch."""
        return max(1, self.world_size // self.mp_size)

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage, None for strategies that do not run under DeepSpeed."""
        return ZERO_STAGES.get(self.strategy)

    @property
    def deepspeed(self) -> bool:
        return self.zero_stage is not None

    @property
    def sharded(self) -> frozenset[Part]:
        """Parts of the training state divided among the data-parallel replicas."""
        return _DP_SHARDED.get(self.strategy, frozenset())

    @property
    def offloaded(self) -> frozenset[Part]:
        """Parts kept in CPU memory instead of the device's."""
        return _OFFLOADED.get(self.strategy, frozenset())

    def per_rank(self, part: Part, size: float, on_host: bool = False) -> float:
        """What of `size` bytes of one part a rank holds on its device. `on_host`: the device is
        the host's memory (a CPU rank), where offloaded parts stay, partitioned like the rest."""
        if part in self.offloaded:
            return size / self.dp_size if on_host else 0.0
        if part in self.sharded:
            size /= self.dp_size
        return size / self.mp_size if self.model_split else size

    def rank(self, rank: int) -> RankPlace:
        """The replica and stage of a global rank. Tensor-parallel peers share their samples (the
        first reports them); in a pipeline only the last stage sees the loss."""
        dp_rank, mp_rank = divmod(rank, self.mp_size)
        reports = {"tensor": mp_rank == 0, "pipeline": mp_rank == self.mp_size - 1}.get(self.model_split, True)
        return RankPlace(dp_rank, mp_rank, reports)

    def stage_layers(self, n_layers: int, stage: int) -> tuple[int, int]:
        """The contiguous decoder layers [lo, hi) of a pipeline stage; the first stages take one
        more when the stages do not divide the layers."""
        base, extra = divmod(n_layers, self.mp_size)
        lo = stage * base + min(stage, extra)
        return lo, lo + base + (1 if stage < extra else 0)
