"""Gaussian Masked Autoencoders: MAE pre-training whose decoder emits 3D Gaussians."""

__version__ = "0.1.0"
