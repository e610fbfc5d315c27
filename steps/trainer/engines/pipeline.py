"""pipeline, and hybrid with a pipeline inner group: the decoder layers are split into
contiguous stages, one per rank, and each optimizer step's batch runs through them as
`grad_accum` micro-batches (torch.distributed.pipelining, GPipe or 1F1B schedule).

Every micro-batch is padded to seq_len so that activations sent between stages keep one shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from steps.plan.schema import CellSpec
from steps.trainer.distributed import Dist, Meshes
from steps.trainer.engines.base import Batch, ModelFacts, ModelSplitEngine, autocast, eval_counts, token_loss_sum

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle


class Stage(nn.Module):
    """One pipeline stage of a Llama-style causal LM: [embeddings] + layers[lo:hi] + [norm, head]."""

    def __init__(self, lm: nn.Module, lo: int, hi: int, first: bool, last: bool, cell: CellSpec,
                 device: torch.device):
        super().__init__()
        core = lm.model
        if lm.config.tie_word_embeddings and not (first and last):
            raise ValueError("pipeline stages cannot split tied input/output embeddings")
        self.first, self.last, self.cell, self.device = first, last, cell, device
        self.embed_tokens = core.embed_tokens if first else None
        # Keyed by the global layer index, so checkpoint keys are unique across stages.
        self.layers = nn.ModuleDict({str(i): core.layers[i] for i in range(lo, hi)})
        self.rotary_emb = core.rotary_emb
        self.norm = core.norm if last else None
        self.lm_head = lm.lm_head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.cell, self.device):
            h = self.embed_tokens(x) if self.first else x
            pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0).expand(h.shape[0], -1)
            pe = self.rotary_emb(h, pos)
            for layer in self.layers.values():
                # No attention mask: padding is on the right and attention is causal, so real
                # tokens never see it, and padded positions carry no loss.
                out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
            return self.lm_head(self.norm(h)) if self.last else h


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

    def __init__(self, cell: CellSpec, d: Dist, model: nn.Module, facts: ModelFacts, total_steps: int,
                 meshes: Meshes):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        layout = cell.layout
        pp, n_stages = layout.rank(d.rank).mp_rank, layout.mp_size
        lm = model.get_base_model() if cell.peft != "full" else model
        lo, hi = layout.stage_layers(lm.config.num_hidden_layers, pp)
        first, last = pp == 0, pp == n_stages - 1
        stage_module = Stage(lm, lo, hi, first, last, cell, d.device)
        super().__init__(cell, d, stage_module, facts, total_steps, meshes)
        self.first, self.last = first, last
        names = {id(p): n for n, p in model.named_parameters()}
        self.full_names = {n: names[id(p)] for n, p in stage_module.named_parameters()}
        # Free what other stages hold; keep the (weightless) skeleton to save the adapter with.
        others = [layer for i, layer in enumerate(lm.model.layers) if not lo <= i < hi]
        others += [m for m, keep in ((lm.model.embed_tokens, first), (lm.model.norm, last),
                                     (lm.lm_head, last)) if not keep]
        for module in others:
            _release(module)
        self.peft_model = model if cell.peft != "full" else None
        self.pp_group = meshes.mp.get_group()
        self.stage = PipelineStage(stage_module, pp, n_stages, d.device, group=self.pp_group)
        # 1F1B needs at least one micro-batch per stage in flight; with fewer, GPipe still runs.
        self.schedule_name = cell.train.parallel.pipeline_schedule
        if self.schedule_name == "1f1b" and cell.grad_accum < n_stages:
            self.schedule_name = "gpipe"
        schedule = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        self.loss_scale = 1.0
        self.schedule = schedule(self.stage, n_microbatches=cell.grad_accum, loss_fn=self._loss)

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
            out = run(ids, target=labels if self.last else None, losses=losses)
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
        """Each stage holds different parameters: the squared norms add up over the pipeline."""
        sq = sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None)
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
