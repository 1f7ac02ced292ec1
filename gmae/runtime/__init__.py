"""Processes and machines: threads, torchrun (distributed), SLURM and submitit (cluster), signals (stopping)."""
