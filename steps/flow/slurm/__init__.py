"""`compute: slurm`: each cell one Slurm batch job, submitted and watched from the flow's train step."""
