"""What the report says, as data: each comparison section's table, columns, texts and figure,
in report order (`SECTIONS`), and the tables and text around them.

`steps/report/build.py` renders them; keeping them apart lets a test check every declared
column against the table it comes from, and a section be added or moved in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from steps.report import analysis, plots
from steps.report.render import Cols

SETTINGS_COLS: Cols = [("model", "model", "text"), ("peft", "method", "text"), ("strategy", "strategy", "text"),
                       ("instance", "instance", "text"), ("world_size", "GPUs", "int")]
# What tells apart configurations beside the settings above: a comparison table shows them all.
SHAPE_COLS: Cols = [("precision", "precision", "text"), ("mb_ga", "mb x ga", "text"), ("seq_len", "seq", "int")]
COMPARE_COLS: Cols = SETTINGS_COLS + SHAPE_COLS
MEM_COLS: Cols = [("train_mem_gb", "training mem GB", "num"), ("peak_mem_gb", "peak mem GB", "num")]
CELL_COL = ("cell", "cell", "text")  # a comparison row's cell (or first repeat, with the number averaged)
RESULTS_COLS: Cols = COMPARE_COLS + [
    ("lr", "lr", "lr"), ("global_batch", "global batch", "int"), ("outcome", "outcome", "text"),
    ("epoch_s", "epoch s", "s"), ("train_s", "train s", "s"), ("wall_s", "wall s", "s"),
    ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_per_device", "tokens/s per GPU", "num"),
    ("mfu", "MFU", "pct"), *MEM_COLS, ("val_loss", "val loss", "num"),
    ("accuracy", "accuracy", "pct"), ("learned", "learned", "text"), ("cost_usd", "cost $", "usd"),
    ("cost_per_mtok", "$ per M tokens", "usd"), ("cell_id", "cell", "text"),
]
FAILED_COLS: Cols = [("cell_id", "cell", "text"), ("outcome", "outcome", "text"),
                     ("stopped_after_steps", "stopped after steps", "int"), ("wall_s", "wall s", "s"),
                     ("error", "reason", "text")]
DIVERGED_COL = ("diverged_at_step", "diverged at step", "int")  # where a run diverged
# Under `economy:`: beside the shared validation, where it comes from and the class's spread.
ECONOMY_RESULTS_COLS: Cols = [("quality_from", "quality from", "text"), ("class_spread", "class spread", "num"),
                              ("ran_wall_s", "wall s as run", "s")]
CLASS_COLS: Cols = [("quality_class", "class", "text"), ("shares", "shares", "text"), ("members", "members", "int"),
                    ("trained", "trained to the end", "int"), ("val_loss_min", "val loss min", "num"),
                    ("val_loss_max", "val loss max", "num"), ("spread", "spread", "num"),
                    ("accuracy_spread", "accuracy spread", "pct")]
ECONOMY_CLASS_COLS: Cols = [("quality_class", "class", "text"), ("shares", "shares", "text"),
                            ("members", "members", "int"), ("quality_from", "quality from", "text"),
                            ("speed_cells", "speed cells", "int"), ("val_loss", "val loss", "num"),
                            ("spread", "spread", "num"), ("spread_from", "spread from", "text"),
                            ("curve_gap", "curve gap", "num"), ("curve_steps", "over steps", "int")]
SAVING_COLS: Cols = [("quantity", "", "text"), ("this_run", "this run", "num"),
                     ("full_measured", "every cell to the end (measured speed cells)", "num"),
                     ("ratio_measured", "ratio", "x"), ("planned", "this run, planned", "num"),
                     ("full_planned", "every cell to the end, planned", "num"), ("ratio_planned", "planned ratio", "x")]


@dataclass(frozen=True)
class Figure:
    """A plot under a section: `plot(table, path)` writes a PNG and returns its path, or None
    when the data has nothing to show. It gets the prepared results table, or the section's own
    table with `of_section`."""

    plot: Callable[[pd.DataFrame, Path], Path | None]
    file: str  # under the report's plots/
    of_section: bool = False


@dataclass(frozen=True)
class FollowUp:
    """A second table under a section, after its figure, with a lead-in sentence. Shown when it
    has rows, or `always` (what each instance type cost matters without a comparison)."""

    table: str  # its key in build.sections(df)
    columns: Cols
    lead: str = ""
    always: bool = False


@dataclass(frozen=True)
class Section:
    """A heading and intro, then the section's table, or what a run needs to have one; then its
    figure and follow-up tables. A section without a table is a figure alone, left out when
    there is nothing to draw."""

    title: str
    table: str | None  # its key in build.sections(df)
    columns: Cols = field(default_factory=list)
    needs: str = ""  # completes "Not in this run: needs ..." when the table is empty
    intro: str = ""
    figure: Figure | None = None
    follow_ups: tuple[FollowUp, ...] = ()
    only_with_data: bool = False  # left out, not "not in this run", when its table is empty


SECTIONS: list[Section] = [
    Section(
        "Scaling", "scaling", COMPARE_COLS + [
            ("base", "against", "text"), ("lr", "lr", "lr"), ("tokens_per_s", "tokens/s", "num"),
            ("epoch_s", "epoch s", "s"), ("speedup", "speedup", "x"), ("epoch_speedup", "epoch speedup", "x"),
            ("efficiency", "efficiency", "pct"), ("val_loss", "val loss", "num"), CELL_COL],
        needs="one configuration at two or more GPU counts",
        intro="Speedup: tokens/s over the smallest GPU count of the same configuration; efficiency: "
              "speedup over the GPU ratio (100% = linear). Each configuration at its best learning rate (the "
              "lowest val loss among its cells that learned): every number of a row is one cell's.",
        figure=Figure(plots.throughput_vs_gpus, "throughput_vs_gpus.png")),
    Section(
        "Methods: memory and throughput", "methods", COMPARE_COLS + [
            ("outcome", "outcome", "text"), *MEM_COLS, ("mem_vs_lora", "memory vs LoRA", "x"),
            ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_vs_lora", "tokens/s vs LoRA", "x"),
            ("lr", "lr", "lr"), ("val_loss", "val loss", "num"), ("learned", "learned", "text"), CELL_COL],
        needs="two or more methods on one configuration",
        intro="Each configuration at its best learning rate. Training memory: the peak less what the runtime "
              "held before the model (`runtime_baseline_gb`: on a CPU the libraries, a bitsandbytes import "
              "among them); memory vs LoRA compares it where both have a baseline, else the peaks.",
        figure=Figure(plots.memory_by_method, "peak_memory.png")),
    Section(
        "Precision", "precisions", COMPARE_COLS + [
            ("outcome", "outcome", "text"), *MEM_COLS, ("mem_vs_first", "memory vs first", "x"),
            ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_vs_first", "tokens/s vs first", "x"),
            ("lr", "lr", "lr"), ("val_loss", "val loss", "num"), ("learned", "learned", "text"), CELL_COL],
        needs="one configuration at two or more precisions"),
    Section(
        "Settings", "settings", COMPARE_COLS + [
            ("setting", "setting", "text"), ("value", "value", "text"), ("others", "with", "text"),
            ("outcome", "outcome", "text"), *MEM_COLS, ("mem_vs_first", "memory vs first", "x"),
            ("tokens_per_s", "tokens/s", "num"), ("tokens_per_s_vs_first", "tokens/s vs first", "x"),
            ("lr", "lr", "lr"), ("val_loss", "val loss", "num"), ("learned", "learned", "text"), CELL_COL],
        needs="one configuration at two or more values of a train/data setting",
        intro="The same configuration at each value of a swept `train.*` / `data.*` setting (`sweep:` in the "
              "matrix), each at its best learning rate: memory and speed relative to the first value.",
        only_with_data=True),
    Section(
        "Memory budget", "memory_budget", SETTINGS_COLS + [
            ("precision", "precision", "text"), ("micro_batch", "micro-batch", "int"), ("seq_len", "seq", "int"),
            ("weights_gb", "weights GB", "num"), ("grads_gb", "grads GB", "num"), ("optim_gb", "optimizer GB", "num"),
            ("activations_gb", "activations GB", "num"), ("estimate_gb", "estimate GB", "num"),
            ("device_gb", "GPU GB", "num"), ("fits", "fits", "text"), ("outcome", "outcome", "text"),
            ("peak_mem_gb", "measured peak GB", "num")],
        needs="cells of preset models that ran",
        intro="Per rank, worked out from the parameter counts and the settings (see "
              "`steps/report/memory_budget.py` for the conventions: 4 bytes per weight, 2 with bf16-true, 0.5 "
              "for a QLoRA base; the cell's optimizer, AdamW 2 states per trainable parameter; activations as "
              "autograd keeps them, by method, precision, attention kernel, LoRA targets, fused kernels and "
              "checkpointing (`steps/estimate/activations.py`); sharding by the cell's parallel layout). On CPU the "
              "measured peak also holds the runtime (about 1 GB of libraries)."),
    Section(
        "Planned vs measured", "planned", SETTINGS_COLS + [
            ("precision", "precision", "text"), ("micro_batch", "micro-batch", "int"),
            ("planned_mem_gb", "planned GB", "num"), ("measured_mem_gb", "measured GB", "num"),
            ("mem_gb_error", "memory error", "pct"), ("planned_tokens_per_s", "planned tokens/s", "num"),
            ("tokens_per_s_low", "low", "num"), ("tokens_per_s_high", "high", "num"),
            ("measured_tokens_per_s", "measured tokens/s", "num"), ("tokens_per_s_error", "tokens/s error", "pct"),
            ("tokens_in", "inside", "text"),
            ("planned_wall_s", "planned wall s", "s"), ("measured_wall_s", "measured wall s", "s"),
            ("wall_s_error", "wall error", "pct"), ("wall_in", "inside", "text"),
            ("cost_usd_error", "cost error", "pct"), ("basis", "time from", "text"),
            ("calibration", "calibration", "text")],
        needs="cells of preset models that trained to the end",
        intro="What `start` printed before this run (the run's `plan.csv`): the probe's times on this machine "
              "(`basis` probe) or the catalog's peaks, calibrated on the runs the store holds (which, how many "
              "cells, from when), each with an interval from the calibration's held-out spread (wider where no "
              "calibration covers the cell); beside what each cell measured, and whether it fell inside. A run "
              "that kept no plan.csv is planned again from first principles. Error: planned / measured - 1. The "
              "planned memory is counted as the measured peak is: on a CPU with the runtime (the cell's measured "
              "`runtime_baseline_gb` where the table has it), on a GPU without the CUDA context; tokens/s counts "
              "real tokens (no padding).",
        follow_ups=(FollowUp("planned_errors", [
            ("quantity", "quantity", "text"), ("cells", "cells", "int"),
            ("median_abs_error", "median |error|", "pct"), ("max_abs_error", "largest |error|", "pct"),
            ("inside", "inside its interval", "pct")],
            lead="The planner's error over this run:"),)),
    Section(
        "Instance types: time and cost", "instances", COMPARE_COLS + [
            ("outcome", "outcome", "text"), ("price_per_hour_usd", "$ per hour", "usd"),
            ("train_s", "train s", "s"), ("wall_s", "wall s", "s"), ("tokens_per_s", "tokens/s", "num"),
            ("cost_usd", "cost $", "usd"), ("cost_per_mtok", "$ per M tokens", "usd"), ("lr", "lr", "lr"),
            ("val_loss", "val loss", "num"), CELL_COL],
        needs="one configuration on two or more instance types",
        follow_ups=(FollowUp("instance_totals", [
            ("instance", "instance", "text"), ("accelerator", "accelerator", "text"),
            ("price_per_hour_usd", "$ per hour", "usd"), ("cells", "cells", "int"), ("ok", "ok", "int"),
            ("wall_s", "wall s (all cells)", "s"), ("cost_usd", "cost $ (all cells)", "usd")], always=True),)),
    Section(
        "Learning rate", "lr_sweep", COMPARE_COLS + [
            ("global_batch", "global batch", "int"), ("lr", "lr", "lr"), ("outcome", "outcome", "text"),
            ("val_loss", "val loss", "num"), ("learned", "learned", "text"), ("best", "best", "text"),
            ("at_edge", "at grid edge", "text")],
        intro="Best: the rate every other section compares the configuration at, the lowest val loss among "
              "its cells that learned (among all its finished cells where none did).",
        needs="one configuration at two or more learning rates",
        figure=Figure(plots.lr_sweep, "lr_sweep.png", of_section=True),
        follow_ups=(FollowUp("lr_scaling", [
            ("model", "model", "text"), ("peft", "method", "text"), ("best_lrs", "batch:best lr", "text"),
            ("exponent", "k", "num"), ("closest_rule", "closest rule", "text"),
            ("any_at_edge", "edge of grid", "text")],
            lead="Best learning rate against global batch, fitted as lr ~ batch^k "
                 "(linear scaling rule: k = 1, square-root rule: k = 0.5):"),)),
    Section(
        "Batch size", "batch_fit", SETTINGS_COLS[:4] + [
            ("world_size", "GPUs", "int"), ("tried", "micro-batches tried", "text"),
            ("largest_ok", "largest that fit", "int"), ("peak_mem_gb_at_largest", "its peak mem GB", "num"),
            ("first_failed", "first that failed", "int"), ("failed_as", "failed as", "text")],
        needs="one configuration at two or more micro-batch sizes",
        follow_ups=(FollowUp("equal_tokens", SETTINGS_COLS + [
            ("micro_batch", "micro-batch", "int"), ("grad_accum", "accum", "int"),
            ("global_batch", "global batch", "int"), ("lr", "lr", "lr"), ("tokens", "tokens", "int"),
            ("loss_at_tokens", "train loss", "num"),
            ("val_loss", "final val loss", "num")],
            lead="Training loss after the same number of tokens (mean over the last 10% of them):"),)),
    Section(
        "Goodput and time to target", "goodput", SETTINGS_COLS + [
            ("lr", "lr", "lr"), ("tokens_per_s", "tokens/s", "num"), ("updates_per_s", "updates/s", "num"),
            ("samples_per_s", "samples/s", "num"), ("target_loss", "target loss", "num"),
            ("time_to_target_s", "time to target s", "s"), ("tokens_to_target", "tokens to target", "int"),
            ("steps_to_target", "steps to target", "int"), ("val_loss", "val loss", "num"),
            ("learned", "learned", "text")],
        needs="finished cells",
        intro="Goodput: optimizer updates (and samples) per second of training. Target: the matrix's "
              "`train.target_loss` (validation loss when evaluated during training), else the median of the "
              f"finished cells' final training losses (mean of the last {analysis.SMOOTH_WINDOW} steps): "
              "half of them reach it."),
    Section("Loss curves", None, figure=Figure(plots.loss_curves, "loss_curves.png")),
    Section(
        "Cost, time and loss: the Pareto set", "pareto", COMPARE_COLS + [
            ("lr", "lr", "lr"), ("global_batch", "global batch", "int"), ("cost_usd", "cost $", "usd"),
            ("wall_s", "wall s", "s"), ("val_loss", "val loss", "num"), ("pareto", "Pareto-optimal", "text"),
            ("rank", "rank", "int"), ("cell_id", "cell", "text")],
        needs="finished cells that learned, with a cost",
        intro="Per model, a cell is Pareto-optimal when no other cell of the model is at least as cheap, as fast "
              "and as low in validation loss, and better in one; the Pareto-optimal come first, ranked by "
              "validation loss. Cells that did not learn are left out (the learned column under Results).",
        figure=Figure(plots.cost_vs_time, "cost_vs_time.png", of_section=True)),
]

DEFINITIONS = """## How the numbers are defined

- tokens/s: non-padding tokens through the forward pass, summed over ranks, over the timed steps
  (warm-up steps excluded); per GPU = divided by the number of ranks.
- MFU: achieved model FLOP/s over the catalog's dense peak of the devices used (fp16 peak for
  fp16-mixed, bf16 for bf16, fp32 for fp32; for fp32 on TF32 tensor cores, the `tf32` column,
  the TF32 peak). FLOPs per token: 6N for full fine-tuning, 4N + 6N trainable with a frozen base
  (no weight gradients for frozen weights), plus the attention term 12·L·H·Q·T (scaled the same
  way). No MFU on CPU: no published peak.
- peak mem: the largest rank's; GPU `max_memory_allocated`, CPU the process's peak resident set.
- val loss: mean next-token loss over the answer tokens of the held-out split; accuracy: exact match
  of the whole answer (teacher-forced argmax).
- epoch s: time per step x steps per epoch; train s: the training loop; wall s: launch to exit.
- cost: wall time x the catalog's on-demand price x instances (local CPU types: x devices, at a
  reference cloud price); $ per M tokens: cost over the tokens trained.
"""
