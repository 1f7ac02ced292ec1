"""Evaluation: zero-shot readout metrics and representation probes."""
