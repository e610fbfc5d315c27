"""What the training loop asks of a parallel strategy, and the plain implementation of it.

The loop hands an engine the micro-batches of one optimizer step and a loss scale; the engine
runs forward and backward its own way (DDP, FSDP, DeepSpeed, a tensor-parallel model, a
pipeline schedule) and returns this rank's share of the summed loss. Shares add up over ranks
to the global sum: ranks that hold a copy of another rank's result (tensor-parallel peers,
early pipeline stages) report zero.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from steps.plan.layout import RankPlace
from steps.plan.schema import CellSpec
from steps.trainer import modeling
from steps.trainer.data import IGNORE
from steps.trainer.distributed import Dist, Meshes
from steps.trainer.engines import chunked_loss
from steps.trainer.engines.optim import build_optimizer, build_scheduler

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelFacts:
    """The model as loaded, before a strategy shards or splits it: what the parameter counts and
    the FLOPs per token are computed from."""

    trainable: int  # trainable parameters (4-bit weights counted by the elements they stand for)
    total: int
    embedding: int  # input-embedding parameters (lookups, not matmuls)
    config: Any  # the model's transformers config
    adapted: tuple[str, ...] = ()  # the module names PEFT put adapters on (last name part)
    weights_dtype: str = ""  # how the frozen base (full fine-tuning: the weights) is stored
    trainable_dtype: str = ""  # how the trainable parameters are stored
    lora_kernels: dict[str, int] | None = None  # what train.lora_kernels routed (steps.trainer.lora_kernels)
    lora_kernels_off: str | None = None  # why the model's own layers kept them off

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelFacts:
        trainable, total = modeling.count_parameters(model)
        tuner = getattr(model, "base_model", None)
        adapted = sorted({n.rsplit(".", 1)[-1] for n in getattr(tuner, "targeted_module_names", [])})
        frozen = [p for p in model.parameters() if not p.requires_grad]
        return cls(trainable, total, modeling.embedding_parameters(model), model.config, tuple(adapted),
                   weights_dtype=modeling.storage_dtype(frozen or list(model.parameters())),
                   trainable_dtype=modeling.storage_dtype([p for p in model.parameters() if p.requires_grad]),
                   lora_kernels=getattr(model, "lora_kernels", None),
                   lora_kernels_off=getattr(model, "lora_kernels_off", None))


def autocast(cell: CellSpec, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision's autocast, and bf16-true adapters' (`modeling.autocast_dtype`)."""
    dtype = modeling.autocast_dtype(cell)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss summed over target tokens (labels are already shifted)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum")


def eval_counts(logits: torch.Tensor, labels: torch.Tensor, eos_id: int) -> list[float]:
    """[loss sum, target tokens, correct tokens, exact answers, answered sequences].

    An answer is exact when every target token but the closing eos is the argmax (teacher
    forcing, which equals greedy decoding of the answer).
    """
    target = labels != IGNORE
    hit = (logits.argmax(-1) == labels) & target
    answer = target & (labels != eos_id)
    answered = answer.any(1)
    exact = ((hit | ~answer).all(1) & answered).sum()
    return [token_loss_sum(logits, labels).item(), target.sum().item(), hit.sum().item(),
            exact.item(), answered.sum().item()]


class Engine:
    """The plain strategy (single): this rank computes full logits for its own micro-batches.
    A strategy's engine overrides only what differs (how gradients are synchronised, where the
    weights live, how a step runs); every attribute the loop and checkpoints read is declared here."""

    cell: CellSpec  # the cell being trained
    d: Dist  # this process: rank, world size, device
    place: RankPlace  # this rank's replica and stage in the cell's layout
    facts: ModelFacts  # parameter counts and config, taken before any sharding
    model: torch.nn.Module  # the part of the model this rank trains: what checkpoints save
    module: torch.nn.Module  # what a forward pass calls: the model or its wrapper (DDP, DeepSpeed)
    peft_model: torch.nn.Module | None  # the whole PEFT model, to save the adapter with; None for full
    params: list[torch.nn.Parameter]  # this rank's trainable parameters
    optimizer: torch.optim.Optimizer  # over `params` (DeepSpeed's wrapper of it under ZeRO)
    scheduler: torch.optim.lr_scheduler.LRScheduler  # the learning-rate schedule, stepped once per step
    scaler: torch.amp.GradScaler | None  # fp16-mixed loss scaling, where the engine does it
    schedule_name: str | None  # the pipeline schedule that runs (gpipe, 1f1b); None without a pipeline

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts,
                 total_steps: int):
        self.cell, self.d, self.facts, self.model, self.module = cell, d, facts, model, model
        self.place = cell.layout.rank(d.rank)
        self.peft_model = model if cell.peft != "full" else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cell)
        self.scheduler = build_scheduler(self.optimizer, cell, total_steps)
        self.scaler = torch.amp.GradScaler(d.device.type) if cell.precision == "fp16-mixed" else None
        self.schedule_name = None

    @classmethod
    @functools.cache
    def declared(cls) -> frozenset[str]:
        """The attributes an engine of this class has: those annotated on it and its bases."""
        return frozenset(name for c in cls.__mro__ for name in inspect.get_annotations(c))

    def __setattr__(self, name: str, value: Any) -> None:
        """Only declared attributes can be set: nothing is patched onto an engine from outside."""
        if name not in self.declared():
            raise AttributeError(f"{type(self).__name__} declares no attribute {name!r}")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ one optimizer step
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.cell, self.d.device)

    def forward(self, batch: Batch) -> torch.Tensor:
        with self.autocast():
            # No KV cache: training never reads one, and with one transformers ignores the
            # position ids that keep packed examples apart.
            return self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch.get("position_ids"), use_cache=False).logits

    def train_loss(self, batch: Batch) -> torch.Tensor:
        """The summed loss of one micro-batch: from its logits, or (`train.loss: chunked`) from
        the final hidden states a chunk of tokens at a time."""
        if self.cell.train.loss == "logits":
            return token_loss_sum(self.forward(batch), batch["labels"])
        head = self.model.get_output_embeddings()
        with chunked_loss.tapped_head(head) as hidden:
            self.forward(batch)
        with self.autocast():
            return chunked_loss.chunked_loss_sum(hidden[0], head, batch["labels"], self.cell.train.loss_chunk,
                                                 liger=self.cell.train.liger and self.d.device.type == "cuda")

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around each micro-batch of an accumulation: strategies that synchronise gradients
        during backward skip it before the `last` one."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def forward_backward(self, micro: list[Batch], scale: float) -> float:
        total = 0.0
        for k, batch in enumerate(micro):
            with self.gradient_sync(last=k == len(micro) - 1):
                loss = self.train_loss(batch)
                self.backward(loss * scale)
            total += loss.item()
        return total if self.place.reports else 0.0

    def sync_gradients(self) -> None:
        """Strategies whose wrapper does not average gradients over replicas do it here."""

    def grad_norm(self) -> torch.Tensor:
        """Norm of all trainable gradients; sharded (DTensor) and plain ones may be mixed."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norms = []
        for group in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
            if group:
                n = torch.nn.utils.get_total_norm(group)
                norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)

    def clip_gradients(self, max_norm: float) -> None:
        """As clip_grad_norm_, with a Python scalar so sharded and plain gradients both take it."""
        coef = max_norm / (self.grad_norm().item() + 1e-6)
        if coef < 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coef)

    def optimizer_step(self) -> None:
        self.sync_gradients()
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.cell.train.max_grad_norm:
            self.clip_gradients(self.cell.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_step(self, micro: list[Batch], eos_id: int) -> list[float]:
        """Summed `eval_counts` of the micro-batches (this rank's share)."""
        counts = [0.0] * 5
        for batch in micro:
            batch_counts = eval_counts(self.forward(batch), batch["labels"], eos_id)
            counts = [a + b for a, b in zip(counts, batch_counts, strict=True)]
        return counts if self.place.reports else [0.0] * 5

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def eval_shape(self) -> tuple[int | None, int]:
        """(width, micro-batches per eval step). Pipelines need one width and full steps."""
        return None, 1

    # ------------------------------------------------------------------ checkpoints
    def save_state(self, folder: Path) -> dict[str, Any]:
        """Write the trainable weights and optimizer state under `folder`, every rank its own
        shard (torch.distributed.checkpoint); return this rank's own small state (scheduler,
        loss scaler), which the checkpoint keeps beside it."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state()[1], checkpoint_id=str(folder / "dcp"))
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state(self, folder: Path, own: dict[str, Any]) -> None:
        """Restore what `save_state` wrote, `own` being what it returned."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        options, state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.model, [self.optimizer], model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=options)
        self.scheduler.load_state_dict(own["scheduler"])
        if self.scaler and own["scaler"]:
            self.scaler.load_state_dict(own["scaler"])

    def _dcp_state(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Flat keys (one per parameter) keep pipeline stages, which hold different parameters, apart.
        options = StateDictOptions(ignore_frozen_params=True, strict=False, flatten_optimizer_state_dict=True)
        msd, osd = get_state_dict(self.model, [self.optimizer], options=options)
        return options, {"model": msd, "optim": osd}

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        """Trainable weights as full tensors (gathered if sharded), on CPU, on every rank."""
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                t = p.full_tensor() if isinstance(p, DTensor) else p
                out[name] = t.detach().to("cpu", copy=True)
        return out


class ModelSplitEngine(Engine):
    """A model copy spread over several ranks (tensor, pipeline) of the layout's grid; in hybrid,
    the copies are data-parallel replicas that average their gradients here (no wrapper does)."""

    meshes: Meshes  # this rank's row (replicas) and column (its model copy) of the grid
    dp_group: ProcessGroup | None  # the replicas to average gradients with; None when there is one

    def __init__(self, cell: CellSpec, d: Dist, model: torch.nn.Module, facts: ModelFacts,
                 total_steps: int, meshes: Meshes):
        super().__init__(cell, d, model, facts, total_steps)
        self.meshes = meshes
        self.dp_group = meshes.dp.get_group() if cell.layout.dp_size > 1 else None

    def sync_gradients(self) -> None:
        if self.dp_group is None:
            return
        replicas = self.cell.layout.dp_size
        for p in self.params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                dist.all_reduce(g, group=self.dp_group)
                g.div_(replicas)
