"""Files in and out: checkpoints (checkpoint), exports and foreign weights (export), run-folder paths and
locks (files), and loading a run's model (runs)."""
