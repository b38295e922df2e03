"""Evaluation jobs that read pre-training checkpoints: linear probe / fine-tune, retrieval, regeneration."""
