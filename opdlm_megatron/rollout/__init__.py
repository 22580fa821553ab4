"""Block-diffusion rollouts of the student (see engine.py).

``config`` (DecodeConfig, the commit rules' names) imports nothing heavy, so command-line parsers
can offer its choices; the engine and the result type load on first use.
"""

from .config import DecodeConfig

__all__ = ["DecodeConfig", "DiffusionRolloutEngine", "RolloutResult"]


def __getattr__(name):
    if name == "DiffusionRolloutEngine":
        from .engine import DiffusionRolloutEngine

        return DiffusionRolloutEngine
    if name == "RolloutResult":
        from .types import RolloutResult

        return RolloutResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
