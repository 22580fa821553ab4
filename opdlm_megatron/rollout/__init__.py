"""Block-diffusion rollouts of the student (see engine.py)."""

from .config import DecodeConfig
from .engine import DiffusionRolloutEngine
from .types import RolloutResult

__all__ = ["DecodeConfig", "DiffusionRolloutEngine", "RolloutResult"]
