"""Files in and out: reading every model file (loader: checkpoints, exports, run folders, timm and MAE
encoders), the checkpoint and export formats and writing them (checkpoint, export), run-folder paths and
locks (files), and what the training loops share (runs)."""
