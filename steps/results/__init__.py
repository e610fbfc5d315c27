"""What a cell produces, as contracts: `metrics.json` (the trainer writes it, the launcher
completes it) and the results table (one row per cell) that the report reads. No torch."""
