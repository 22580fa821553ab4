"""What every console script shares: a parser named after the script, and one way to refuse bad input -
one line naming the problem (``<program>: error: ...``), exit code 2, no traceback, printed once (by
global rank 0 under torchrun). ``OPDLM_DEBUG=1`` shows the traceback instead, for the rare case where
a ValueError is a bug rather than bad input."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, Optional, TypeVar

from ..rollout.config import DecodeConfig
from ..runtime.console import error_message
from ..runtime.distributed import global_rank

T = TypeVar("T")

# OSError: a missing or read-only path, a full disk, a file where a directory was expected ...
USER_ERRORS = (ValueError, OSError)


def refuse_bad_input(program: str, run: Callable[[], T]) -> T:
    """Runs ``run()``; a user error becomes ``<program>: error: <message>`` on stderr and exit code 2."""
    try:
        return run()
    except USER_ERRORS as error:
        if os.environ.get("OPDLM_DEBUG"):
            raise
        if global_rank() == 0:
            print(f"{program}: error: {error_message(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def argument_parser(program: str, doc: Optional[str], **kwargs) -> argparse.ArgumentParser:
    """A parser whose usage and errors name ``program`` (the console script), with ``--verbose``."""
    parser = argparse.ArgumentParser(prog=program, description=doc, **kwargs)
    parser.add_argument("--verbose", action="store_true",
                        help="show third-party logging and warnings on the screen too (also: OPDLM_DEBUG=1)")
    return parser


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tp`` / ``--pp`` (the layout a checkpoint is loaded at; under torchrun) and ``--device``."""
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))


def decode_config_from_flags(**fields) -> DecodeConfig:
    """``DecodeConfig(**fields)`` from command-line flags of the same names; a refused value is named by
    the flag the user typed (``--tokens-per-step``), not by the dataclass field."""
    try:
        return DecodeConfig(**fields)
    except ValueError as error:
        raise ValueError(re.sub(r"DecodeConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"),
                                str(error))) from None
