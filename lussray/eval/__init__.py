"""Evaluation exactly as the official ImageNet-S evaluator (pure numpy/scipy)."""
