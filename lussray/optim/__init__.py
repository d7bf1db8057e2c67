"""Optimizers and schedules (pure torch): LARS with apex LARC semantics, step-based schedules."""

from lussray.optim.lars import LARS
from lussray.optim.schedules import cosine_schedule

__all__ = ["LARS", "cosine_schedule"]
