"""Losses and training steps, one module per method (pure torch)."""
