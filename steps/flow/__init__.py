"""Running the matrix: what each Metaflow step does, launching and watching a cell's trainer,
CPU cores, remote compute, per-cell cards. No torch: the trainer runs in its own processes."""
