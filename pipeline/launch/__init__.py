"""Launch code (Slurm jobs, sweeps), apart from the training code."""
