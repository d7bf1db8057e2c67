"""Backbones and heads (pure torch)."""
