"""Benchmarks: speed ratios measured in one run (suite, behind `gmae bench`) and the training process its
contention benchmarks start (worker). Torch-free, so that `python -m gmae.bench.worker` applies gmae's thread
defaults before torch loads."""
