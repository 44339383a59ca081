"""Training: the loop, its checkpoints, and where it runs (in-process or Ray Train)."""
