"""Figures: the reconstruction figure (figures), training curves (plot), TensorBoard (board)."""
