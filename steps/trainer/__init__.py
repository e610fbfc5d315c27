"""The trainer: one cell, its own processes (`torchrun -m steps.train`). The only package that
imports torch; it reads the plan's cell and writes the results' metrics, nothing of the flow."""
