"""Pieces of the training loop (``lavin_edge.train``): schedule, checkpoints, distributed setup, plots."""
