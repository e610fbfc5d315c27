"""Estimating: what each planned cell will hold, take and cost before anything runs.

How much memory (`memory`, with `activations`), how long (`step_time`, from `params`' FLOPs),
how much money (`cost`); one cell's verdict (`planner`) and the cheapest change that fits
(`fixes`); a whole matrix (`matrix_plan`); the planner fitted to measured runs (`calibrate`);
`python -m steps.plan` (`cli`). Reads the plan room's cells and catalogs; imports no torch, and
nothing of the flow, the trainer or the report.
"""
