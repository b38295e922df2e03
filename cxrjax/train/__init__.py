"""Training: the jitted steps, checkpoints and metrics of the pre-training jobs."""
