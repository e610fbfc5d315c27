"""pipeline, and hybrid with a pipeline inner group: the decoder layers are split into
contiguous stages, one per rank, and each optimizer step's batch runs through them as
`grad_accum` micro-batches (torch.distributed.pipelining, GPipe or 1F1B schedule).

Every micro-batch is padded to seq_len so that activations sent between stages keep one shape.
"""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from steps.plan.schema import CellSpec
from steps.trainer import split
from steps.trainer.distributed import Dist, Meshes
from steps.trainer.engines.base import Batch, ModelFacts, ModelSplitEngine, autocast, eval_counts, token_loss_sum

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle


class Stage(nn.Module):
    """One pipeline stage of a causal LM, run by the model's own forward with this stage's layers
    only: the first stage from the token ids, later ones with their input put in at their first
    layer (what the decoder computes before the layers is then discarded), and only the last
    with the final norm and the output head (soft-capping and all, as the model defines them).

    The stage owns (trains, checkpoints) its layers, keyed by their global index, and the parts
    before the layers (first stage) or after them (last stage)."""

    def __init__(self, lm: nn.Module, lo: int, hi: int, first: bool, last: bool, cell: CellSpec,
                 device: torch.device):
        super().__init__()
        self.first, self.last, self.cell, self.device = first, last, cell, device
        parts = split.anatomy(lm)
        self.parts = nn.ModuleDict(split.stage_parts(lm, parts, lo, hi, first, last))
        embedding = lm.get_input_embeddings()
        self.embed_dim, self.embed_dtype = embedding.weight.shape[-1], embedding.weight.dtype
        local = [parts.layers[i] for i in range(lo, hi)]
        if not first:
            local[0] = _TakeStageInput(local[0], self)
        decoder = parts.decoder
        config = copy.copy(decoder.config)  # the loop reads per-layer settings by local index
        config.num_hidden_layers = hi - lo
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[lo:hi]
        # What the model's forward sees while this stage runs it, swapped in only then: outside
        # a forward the model keeps its whole structure (the adapter is saved from it).
        rewiring = [(decoder, parts.layers_name, nn.ModuleList(local)), (decoder, "config", config)]
        if not last:
            rewiring += [(decoder, n, nn.Identity()) for n in parts.after if getattr(decoder, n) is not None]
        object.__setattr__(self, "_rewiring", rewiring)
        object.__setattr__(self, "_lm", lm)
        object.__setattr__(self, "_decoder", decoder)
        self.stage_input: torch.Tensor | None = None
        # Packed rows: their position ids travel with the activations from stage to stage.
        self.packed = cell.data.packing

    @contextlib.contextmanager
    def _rewired(self):
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in self._rewiring]
        for obj, name, value in self._rewiring:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None):
        with autocast(self.cell, self.device):
            if self.first:
                inputs = {"input_ids": x}
            else:
                self.stage_input = x
                inputs = {"inputs_embeds": x.new_zeros(*x.shape[:2], self.embed_dim, dtype=self.embed_dtype)}
            if positions is not None:
                inputs["position_ids"] = positions
            # No attention mask: padding is on the right and attention is causal, so real
            # tokens never see it, and padded positions carry no loss.
            try:
                with self._rewired():
                    if self.last:
                        return self._lm(**inputs, use_cache=False).logits
                    hidden = self._decoder(**inputs, use_cache=False)[0]
                    return (hidden, positions) if self.packed else hidden
            finally:
                self.stage_input = None


class _TakeStageInput(nn.Module):
    """A later stage's first layer: it runs on the stage's input, not on what the decoder
    computed before the layers. Swapped outside the layer, so that gradient checkpointing
    saves (and recomputes from) the stage input."""

    def __init__(self, layer: nn.Module, stage: Stage):
        super().__init__()
        self.layer = layer
        object.__setattr__(self, "_stage", stage)

    def forward(self, *args, **kwargs):
        x = self._stage.stage_input
        if args:
            args = (x, *args[1:])
        else:
            kwargs["hidden_states"] = x
        return self.layer(*args, **kwargs)


def _positions(micro: list[Batch], ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([b["position_ids"] if b.get("position_ids") is not None else
                      torch.arange(b["input_ids"].shape[1], device=ids.device).expand_as(b["input_ids"])
                      for b in micro])


def _release(module: nn.Module) -> None:
    """Move a module's weights to the meta device. bitsandbytes' 4-bit parameters cannot move
    there; they are a quarter of their bf16 size and stay."""
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            if type(p).__name__ != "Params4bit":
                sub._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)


class PipelineEngine(ModelSplitEngine):
    """This rank's stage of the model copy; a schedule runs the step's micro-batches through
    the stages, and only the last stage sees logits and losses."""

    first: bool  # holds the embeddings: feeds the token ids in
    last: bool  # holds the norm and head: computes the loss
    full_names: dict[str, str]  # a stage parameter's name in the whole model (the adapter's keys)
    pp_group: ProcessGroup  # the stages of this rank's model copy
    stage: PipelineStage  # this rank's `Stage` as torch's pipelining runs it
    schedule: PipelineScheduleSingle  # GPipe or 1F1B over the step's micro-batches
    loss_scale: float  # the loop's scale of the step being run, for the schedule's loss function
    tied: nn.Parameter | None  # a trained embedding matrix the first and last stages both hold
    tied_group: ProcessGroup | None  # this model copy's first and last stage, to add its gradients over

    def __init__(self, cell: CellSpec, d: Dist, model: nn.Module, facts: ModelFacts, total_steps: int,
                 meshes: Meshes):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        layout = cell.layout
        pp, n_stages = layout.rank(d.rank).mp_rank, layout.mp_size
        lm = model.get_base_model() if cell.peft != "full" else model
        lo, hi = layout.stage_layers(lm.config.num_hidden_layers, pp)
        first, last = pp == 0, pp == n_stages - 1
        # Names in the whole model (the adapter's keys) and the parts other stages hold, taken
        # before the stage rewires the model's forward to its own layers.
        names = {id(p): n for n, p in model.named_parameters()}
        parts = split.anatomy(lm)
        head = lm.get_output_embeddings()
        tied = head is not None and head.weight is lm.get_input_embeddings().weight and head.weight.requires_grad
        tied_weight = head.weight if tied and (first or last) else None
        others = [layer for i, layer in enumerate(parts.layers) if not lo <= i < hi]
        if not first:
            others.append(lm.get_input_embeddings())
        if not last:
            others += [getattr(parts.decoder, n) for n in parts.after] + [getattr(lm, n) for n in parts.head]
        stage_module = Stage(lm, lo, hi, first, last, cell, d.device)
        super().__init__(cell, d, stage_module, facts, total_steps, meshes)
        self.first, self.last = first, last
        self.full_names = {n: names[id(p)] for n, p in stage_module.named_parameters()}
        # Free what other stages hold. A tied output embedding stays on the last stage (the first
        # stage's input embedding is the same matrix): each of the two keeps its own copy.
        for module in others:
            if isinstance(module, nn.Module):
                _release(module)
        self.tied, self.tied_group = tied_weight, self._end_stages_group(n_stages) if tied else None
        self.peft_model = model if cell.peft != "full" else None
        self.pp_group = meshes.mp.get_group()
        self.stage = PipelineStage(stage_module, pp, n_stages, d.device, group=self.pp_group)
        # 1F1B needs at least one micro-batch per stage in flight; with fewer, GPipe still runs.
        self.schedule_name = cell.train.parallel.pipeline_schedule
        if self.schedule_name == "1f1b" and cell.grad_accum < n_stages:
            self.schedule_name = "gpipe"
        schedule = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        self.loss_scale = 1.0
        # The loss is already the step's token sum over the global batch's tokens (`_loss`): the
        # schedule must not divide the gradients by the micro-batches again (its default). With
        # that division the gradients were 1/grad_accum of one process's: Adam hides a constant
        # scale, but gradient clipping and SGD do not (a clipped step followed by an unclipped
        # one, and the runs part).
        self.schedule = schedule(self.stage, n_microbatches=cell.grad_accum, loss_fn=self._loss, scale_grads=False)

    def _end_stages_group(self, n_stages: int) -> ProcessGroup | None:
        """The first and last stage of this rank's model copy. With full fine-tuning of a model
        whose output embedding is its input embedding, the first stage trains the matrix as the
        embedding and the last as the head; their gradients add up before each step (as
        Megatron does), so both copies take the same updates and stay equal."""
        group = None
        for replica in range(self.cell.layout.dp_size):  # every rank creates every group, in order
            ends = [replica * n_stages, replica * n_stages + n_stages - 1]
            g = dist.new_group(ends)
            if self.d.rank in ends:
                group = g
        return group

    def sync_gradients(self) -> None:
        if self.tied is not None and self.tied.grad is not None:
            dist.all_reduce(self.tied.grad, group=self.tied_group)
        super().sync_gradients()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) * self.loss_scale

    def eval_shape(self) -> tuple[int, int]:
        return self.cell.seq_len, self.cell.grad_accum

    def _run(self, micro: list[Batch], train: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        ids = torch.cat([b["input_ids"] for b in micro])
        labels = torch.cat([b["labels"] for b in micro])
        losses: list[torch.Tensor] = []
        run = self.schedule.step if train else self.schedule.eval
        if self.first:
            # Packed cells hand every stage the rows' position ids (evaluation rows, not packed:
            # 0, 1, 2, ... as the model would use).
            inputs = (ids, _positions(micro, ids)) if self.model.packed else (ids,)
            out = run(*inputs, target=labels if self.last else None, losses=losses)
        elif self.last:
            out = run(target=labels, losses=losses)
        else:
            out = run()
        return losses, out

    def forward_backward(self, micro: list[Batch], scale: float) -> float:
        self.loss_scale = scale
        losses, _ = self._run(micro, train=True)
        return sum(loss.item() for loss in losses) / scale if self.last else 0.0

    def grad_norm(self) -> torch.Tensor:
        """Each stage holds different parameters: the squared norms add up over the pipeline
        (a tied embedding counted once, on the first stage)."""
        counted = [p for p in self.params if p.grad is not None and not (self.last and p is self.tied)]
        sq = sum((p.grad.float() ** 2).sum() for p in counted)
        sq = torch.as_tensor(sq, dtype=torch.float32, device=self.d.device)
        dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    @torch.no_grad()
    def eval_step(self, micro: list[Batch], eos_id: int) -> list[float]:
        self.loss_scale = 1.0
        labels = torch.cat([b["labels"] for b in micro])
        _, logits = self._run(micro, train=False)
        return eval_counts(logits, labels, eos_id) if self.last else [0.0] * 5

    def full_trainable_state(self) -> dict[str, torch.Tensor]:
        return {self.full_names[n]: p.detach().to("cpu", copy=True)
                for n, p in self.model.named_parameters() if p.requires_grad}
