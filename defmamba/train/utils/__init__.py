"""Helpers of the classification application: logging, distributed setup, checkpoints,
learning-rate schedule, EMA and optimizer construction."""
