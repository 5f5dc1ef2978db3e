"""The training loop and its parts: optimiser, step, checkpoints, metrics."""
