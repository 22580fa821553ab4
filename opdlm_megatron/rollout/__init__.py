"""Block-diffusion rollouts of the student (see engine.py)."""

from .types import RolloutResult

__all__ = ["RolloutResult"]
