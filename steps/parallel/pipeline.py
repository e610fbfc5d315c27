"""pipeline, and hybrid with a pipeline inner group: the decoder layers are split into
contiguous stages, one per rank, and each optimizer step's batch runs through them as
`grad_accum` micro-batches (torch.distributed.pipelining, GPipe or 1F1B schedule).

Every micro-batch is padded to seq_len so that activations sent between stages keep one shape.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from steps.distributed import Dist
from steps.parallel.engine import Engine, Layout, autocast, eval_counts, token_loss_sum
from steps.schema import CellSpec


def stage_bounds(n_layers: int, n_stages: int, stage: int) -> tuple[int, int]:
    """Contiguous layer ranges, the first stages taking one more when it does not divide."""
    base, extra = divmod(n_layers, n_stages)
    lo = stage * base + min(stage, extra)
    return lo, lo + base + (1 if stage < extra else 0)


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


class PipelineEngine(Engine):
    def __init__(self, cell: CellSpec, d: Dist, model: nn.Module, dp_mesh, pp_mesh, total_steps: int):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        pp, n_stages = pp_mesh.get_local_rank(), pp_mesh.size()
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        lo, hi = stage_bounds(lm.config.num_hidden_layers, n_stages, pp)
        self.first, self.last = pp == 0, pp == n_stages - 1
        stage_module = Stage(lm, lo, hi, self.first, self.last, cell, d.device)
        names = {id(p): n for n, p in model.named_parameters()}
        self.full_names = {n: names[id(p)] for n, p in stage_module.named_parameters()}
        layout = Layout(dp_mesh.get_local_rank(), dp_mesh.size(), reports=self.last)
        super().__init__(cell, d, stage_module, layout, total_steps)
        # Free what other stages hold; keep the (weightless) skeleton to save the adapter with.
        others = [layer for i, layer in enumerate(lm.model.layers) if not lo <= i < hi]
        others += [m for m, keep in ((lm.model.embed_tokens, self.first), (lm.model.norm, self.last),
                                     (lm.lm_head, self.last)) if not keep]
        for module in others:
            _release(module)
        self.peft_model = model if hasattr(model, "peft_config") else None
        self.pp_group = pp_mesh.get_group()
        self.dp_group = dp_mesh.get_group() if layout.dp_size > 1 else None
        self.stage = PipelineStage(stage_module, pp, n_stages, d.device, group=self.pp_group)
        # 1F1B needs at least one micro-batch per stage in flight; with fewer, GPipe still runs.
        self.schedule_name = cell.train.parallel.pipeline_schedule
        if self.schedule_name == "1f1b" and cell.grad_accum < n_stages:
            self.schedule_name = "gpipe"
        schedule = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        self._scale = 1.0
        self.schedule = schedule(self.stage, n_microbatches=cell.grad_accum, loss_fn=self._loss)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels) * self._scale

    def eval_shape(self) -> tuple[int, int]:
        return self.cell.seq_len, self.cell.grad_accum

    def _run(self, micro: list[dict[str, torch.Tensor]], train: bool) -> tuple[list, object]:
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

    def forward_backward(self, micro, scale):
        self._scale = scale
        losses, _ = self._run(micro, train=True)
        return sum(loss.item() for loss in losses) / scale if self.last else 0.0

    def sync_gradients(self) -> None:
        if self.dp_group is None:
            return
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.dp_group)
                p.grad.div_(self.layout.dp_size)

    def grad_norm(self) -> torch.Tensor:
        """Each stage holds different parameters: the squared norms add up over the pipeline."""
        sq = sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None)
        sq = torch.as_tensor(sq, dtype=torch.float32, device=self.d.device)
        dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    @torch.no_grad()
    def eval_step(self, micro: list[dict[str, torch.Tensor]], eos_id: int) -> list[float]:
        self._scale = 1.0
        labels = torch.cat([b["labels"] for b in micro])
        _, logits = self._run(micro, train=False)
        return eval_counts(logits, labels, eos_id) if self.last else [0.0] * 5

    def full_trainable_state(self):
        return {self.full_names[n]: p.detach().to("cpu", copy=True)
                for n, p in self.model.named_parameters() if p.requires_grad}
