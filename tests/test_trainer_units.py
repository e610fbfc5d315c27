"""The trainer's pieces on their own, in process and fast: batch assembly, the learning-rate
schedule, pipeline stage bounds, DeepSpeed's configuration, the loop's progress record, the
heartbeat, and the engine's declared attributes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from steps.results.metrics import HEARTBEAT_DIR, PARTIAL_CURVES, LossPoint, ValPoint
from steps.trainer import data
from steps.trainer.distributed import Dist
from steps.trainer.engines.base import Engine, ModelFacts
from steps.trainer.engines.optim import build_optimizer, build_scheduler, lr_lambda
from steps.trainer.engines.zero import deepspeed_config
from steps.trainer.liveness import Heartbeat
from steps.trainer.progress import Progress, Target
from tests.conftest import make_cell

PAD = 0


def example(ids: list[int], answer_from: int) -> data.Example:
    """Targets are the tokens from index `answer_from` on."""
    return data.Example(ids=ids, target=[i >= answer_from for i in range(len(ids))])


# ---------------------------------------------------------------- batches
def test_collate_pads_right_and_masks_labels():
    batch = data.collate([example([1, 2, 3, 4], 2), example([5, 6, 7], 1)], PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 6, PAD]]
    assert batch["labels"].tolist() == [[-100, 3, 4], [6, 7, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert data.real_tokens(batch) == 5


def test_collate_without_padding_has_no_attention_mask_unless_a_width_pads_it():
    rows = [example([1, 2, 3], 1), example([4, 5, 6], 2)]
    batch = data.collate(rows, PAD)
    assert batch["attention_mask"] is None and data.real_tokens(batch) == 4
    assert batch["labels"].tolist() == [[2, 3], [-100, 6]]
    wide = data.collate(rows, PAD, width=4)
    assert wide["input_ids"].tolist() == [[1, 2, PAD, PAD], [4, 5, PAD, PAD]]
    assert wide["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def _numbered(n: int) -> list[data.Example]:
    """Example i starts with token i and has 2 + i % 3 inputs."""
    return [example([i] + [100 + k for k in range(2 + i % 3)], 1) for i in range(n)]


def test_global_batches_give_each_replica_its_slice_in_micro_batches():
    examples = _numbered(12)
    batches = data.GlobalBatches(examples, global_batch=4, seed=0)
    assert batches.steps_per_epoch == 3
    for step in range(4):  # step 3 starts a new epoch with a new order
        epoch, within = divmod(step, 3)
        order = torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).tolist()
        expected = order[within * 4 : within * 4 + 4]
        firsts = []
        for replica in range(2):
            micro = batches.micro_batches(step, replica, 2, micro_batch=1, pad_id=PAD)
            assert len(micro) == 2  # 2 sequences per replica, 1 per micro-batch
            for b in micro:
                i = b["input_ids"][0, 0].item()
                assert b["input_ids"].shape == (1, 2 + i % 3) and b["attention_mask"] is None
                firsts.append(i)
        assert firsts == expected


def test_micro_batches_pad_to_their_longest_row_or_to_a_given_width():
    batches = data.GlobalBatches(_numbered(8), global_batch=8, seed=3)
    micro = batches.micro_batches(0, 0, 1, micro_batch=4, pad_id=PAD)
    rows = batches.replica_examples(0, 0, 1)
    assert [b["input_ids"].shape[1] for b in micro] == [max(len(e.ids) - 1 for e in rows[k : k + 4]) for k in (0, 4)]
    assert [b["input_ids"].shape for b in batches.micro_batches(0, 0, 1, 2, PAD, width=6)] == [(2, 6)] * 4


# ---------------------------------------------------------------- learning rate
@pytest.mark.parametrize("schedule,factors", [
    ("cosine", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 10: 0.0, 12: 0.0}),
    ("linear", {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.75, 6: 0.5, 10: 0.0, 12: 0.0}),
    ("constant", {0: 0.5, 1: 1.0, 2: 1.0, 6: 1.0, 10: 1.0}),
])
def test_learning_rate_warms_up_then_follows_its_schedule(schedule, factors):
    cell = make_cell(train={"lr_warmup_steps": 2, "lr_schedule": schedule})
    factor = lr_lambda(cell, total_steps=10)
    assert {step: factor(step) for step in factors} == pytest.approx(factors, abs=1e-15)


def test_the_scheduler_gives_the_optimizer_the_scheduled_learning_rates():
    cell = make_cell(lr=1e-3, train={"lr_warmup_steps": 0, "lr_schedule": "cosine"})
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(2))], cell)
    scheduler = build_scheduler(optimizer, cell, total_steps=4)
    lrs = []
    for _ in range(5):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-3, 1e-3 * (1 + math.sqrt(0.5)) / 2, 5e-4, 1e-3 * (1 - math.sqrt(0.5)) / 2, 0.0],
                                abs=1e-18)


# ---------------------------------------------------------------- layout
def test_pipeline_stages_take_contiguous_layers_the_first_ones_more():
    layout = make_cell(strategy="pipeline", gpus=3, micro_batch=2, grad_accum=3).layout
    assert [layout.stage_layers(7, s) for s in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [layout.stage_layers(6, s) for s in range(3)] == [(0, 2), (2, 4), (4, 6)]
    assert [layout.rank(r).reports for r in range(3)] == [False, False, True]  # the last stage has the loss


def test_hybrid_ranks_are_replicas_of_consecutive_stages():
    layout = make_cell(strategy="hybrid", gpus=4, micro_batch=1, grad_accum=2).layout
    assert [(p.dp_rank, p.mp_rank) for p in map(layout.rank, range(4))] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [layout.stage_layers(4, s) for s in range(2)] == [(0, 2), (2, 4)]


# ---------------------------------------------------------------- DeepSpeed
def test_deepspeed_config_of_a_zero3_fp16_cell():
    cell = make_cell(strategy="zero3", gpus=2, micro_batch=2, grad_accum=3, precision="fp16-mixed",
                     train={"max_grad_norm": 0.5})
    config = deepspeed_config(cell, hidden_size=64)
    assert config["zero_optimization"] == {"stage": 3, "reduce_bucket_size": 4096,
                                           "stage3_prefetch_bucket_size": 3686,
                                           "stage3_param_persistence_threshold": 640}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
            config["train_batch_size"]) == (2, 3, 12)
    assert config["fp16"] == {"enabled": True, "initial_scale_power": 16} and "bf16" not in config
    assert config["gradient_clipping"] == 0.5


def test_deepspeed_config_offloads_and_follows_the_cell():
    offload = deepspeed_config(make_cell(strategy="zero3_offload", gpus=2, precision="bf16-true"))
    assert offload["zero_optimization"] == {
        "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False}}  # no hidden size: DeepSpeed's buckets
    assert offload["bf16"] == {"enabled": True} and offload["gradient_clipping"] == 1.0
    zero2 = deepspeed_config(make_cell(strategy="zero2", gpus=2, train={"max_grad_norm": None}), hidden_size=32)
    assert zero2["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1024}
    assert not {"fp16", "bf16"} & set(zero2)
    # No clipping is 0.0, said: DeepSpeed 0.19 clips at 1.0 when the key is absent.
    assert zero2["gradient_clipping"] == 0.0
    assert zero2["train_batch_size"] == 8 and zero2["zero_allow_untested_optimizer"] is True


# ---------------------------------------------------------------- progress
def _point(step: int, loss: float, tokens: float) -> LossPoint:
    return LossPoint(step=step, loss=loss, lr=1e-3, tokens=tokens, time_s=0.5 * step)


def test_progress_keeps_warm_up_steps_out_of_the_throughput():
    p = Progress()
    p.add_step(_point(1, 5.0, 100), seconds=2.0, warm=True, seq_tokens=90, sequences=4)
    p.add_step(_point(2, 4.0, 100), seconds=0.5, warm=False, seq_tokens=80, sequences=4)
    p.add_step(_point(3, 3.0, 60), seconds=0.3, warm=False, seq_tokens=40, sequences=4)
    assert (p.warm_tokens, p.warm_s, p.warm_tokens_per_s) == (100, 2.0, 50.0)
    assert (p.timed_tokens, p.timed_s, p.timed_steps) == (160, 0.8, 2)
    assert p.tokens_per_s == pytest.approx(200.0) and p.step_s == pytest.approx(0.4)
    assert p.mean_seq_tokens == 15.0  # this rank's 120 real tokens over 8 sequences
    assert [c.step for c in p.loss_curve] == [1, 2, 3]
    assert Progress().tokens_per_s is None and Progress().step_s is None and Progress().mean_seq_tokens == 0.0


def test_progress_finds_the_first_point_at_the_target():
    p = Progress()
    for step, loss in enumerate([5.0, 4.2, 3.9, 3.5], 1):
        p.add_step(_point(step, loss, 10.0 * step), seconds=0.1, warm=False, seq_tokens=1, sequences=1)
    p.check_target(None, on_val=False)
    assert p.target is None
    p.check_target(4.0, on_val=False)
    assert p.target == Target(step=3, time_s=1.5, tokens=60.0)
    p.check_target(3.6, on_val=False)  # the first time counts
    assert p.target.step == 3
    on_val = Progress(loss_curve=p.loss_curve, val_curve=[
        ValPoint(step=2, time_s=1.0, val_loss=4.5), ValPoint(step=4, time_s=2.0, val_loss=3.8)])
    on_val.check_target(4.0, on_val=True)
    assert on_val.target == Target(step=4, time_s=2.0, tokens=100.0)


def test_progress_round_trips_through_plain_data():
    p = Progress(train_s=3.25, timed_tokens=10.0, timed_s=1.0, timed_steps=2, warm_tokens=5.0, warm_s=0.5,
                 seq_tokens=7.0, seq_count=2.0, target=Target(1, 0.5, 5.0),
                 loss_curve=[_point(1, 4.0, 5.0)], val_curve=[ValPoint(step=1, time_s=0.5, val_loss=4.1, accuracy=0.5)])
    plain = p.to_dict()
    assert json.loads(json.dumps(plain)) == plain  # nothing but plain data
    assert plain["loss_curve"] == [{"step": 1, "loss": 4.0, "lr": 1e-3, "tokens": 5.0, "time_s": 0.5}]
    assert plain["target"] == {"step": 1, "time_s": 0.5, "tokens": 5.0}
    assert Progress.from_dict(plain) == p


# ---------------------------------------------------------------- heartbeat
def test_heartbeat_holds_the_pid_and_rank_0_streams_new_curve_points(tmp_path):
    beat = Heartbeat(tmp_path, 0)
    pid_file = tmp_path / HEARTBEAT_DIR / "rank0"
    assert pid_file.read_text() == f"{os.getpid()}\n"
    p = Progress()
    p.add_step(_point(1, 5.0, 8.0), 0.1, warm=True, seq_tokens=8, sequences=1)
    p.add_step(_point(2, 4.5, 8.0), 0.1, warm=False, seq_tokens=8, sequences=1)
    os.utime(pid_file, (0, 0))
    beat.beat(p)  # the first beat: training has started, hang detection may begin
    assert pid_file.stat().st_mtime > 0 and pid_file.read_text() == f"{os.getpid()}\ntraining\n"
    os.utime(pid_file, (0, 0))
    beat.beat(p)
    assert pid_file.stat().st_mtime > 0 and pid_file.read_text() == f"{os.getpid()}\ntraining\n"
    p.add_step(_point(3, 4.0, 8.0), 0.1, warm=False, seq_tokens=8, sequences=1)
    p.val_curve.append(ValPoint(step=3, time_s=1.5, val_loss=4.2, accuracy=None, token_accuracy=0.25))
    beat.beat(p)
    beat.beat(p)  # nothing new
    lines = [json.loads(line) for line in (tmp_path / PARTIAL_CURVES).read_text().splitlines()]
    assert [(x["curve"], x["step"]) for x in lines] == [("loss_curve", 1), ("loss_curve", 2), ("loss_curve", 3),
                                                        ("val_curve", 3)]
    assert lines[1] == {"curve": "loss_curve", "step": 2, "loss": 4.5, "lr": 1e-3, "tokens": 8.0, "time_s": 1.0}
    assert lines[3] == {"curve": "val_curve", "step": 3, "time_s": 1.5, "val_loss": 4.2, "accuracy": None,
                        "token_accuracy": 0.25}


def test_heartbeat_of_other_ranks_writes_no_curve(tmp_path):
    beat = Heartbeat(tmp_path, 3)
    p = Progress(loss_curve=[_point(1, 5.0, 8.0)])
    beat.beat(p)
    assert (tmp_path / HEARTBEAT_DIR / "rank3").read_text() == f"{os.getpid()}\ntraining\n"
    assert not (tmp_path / PARTIAL_CURVES).exists()


# ---------------------------------------------------------------- engine
def test_an_engine_takes_only_its_declared_attributes():
    cell = make_cell(peft="full", lr=2e-3, train={"lr_warmup_steps": 4})
    model = torch.nn.Linear(3, 2)
    facts = ModelFacts(trainable=8, total=8, embedding=0, config=None)
    engine = Engine(cell, Dist(rank=0, local_rank=0, world=1, device=torch.device("cpu")), model, facts, 10)
    assert engine.place.reports and engine.place.dp_rank == 0 and engine.schedule_name is None
    assert engine.peft_model is None and engine.module is model and len(engine.params) == 2
    assert engine.lr() == pytest.approx(2e-3 / 4)
    with pytest.raises(AttributeError, match="declares no attribute 'param_counts'"):
        engine.param_counts = (8, 8, 0)


# ---------------------------------------------------------------- random-init cache
def _write_random_checkpoint_on_rank_1(rank: int, init_file: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["FINETUNE_MATRIX_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1:  # the rank that takes the lock first need not be global rank 0
        from steps.trainer.modeling import random_checkpoint

        with open(out, "w") as fh:
            fh.write(str(random_checkpoint(make_cell(), 259)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_random_checkpoint_written_by_rank_1_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.multiprocessing.spawn(_write_random_checkpoint_on_rank_1, nprocs=2, args=(
        str(tmp_path / "init"), str(tmp_path / "cache"), str(tmp_path / "folder")))
    folder = (tmp_path / "folder").read_text()
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    again = AutoModelForCausalLM.from_config(model.config)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
