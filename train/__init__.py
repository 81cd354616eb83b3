"""Training: the PixelDance recipe (data, memory-lean trainer, checkpoints)."""
