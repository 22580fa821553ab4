"""One way for every command-line entry point to refuse bad input: one line naming the problem,
exit code 2, no traceback, printed once (by global rank 0 under torchrun). ``OPDLM_DEBUG=1`` shows
the traceback instead, for the rare case where a ValueError is a bug rather than bad input."""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def _global_rank() -> int:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except ImportError:
        pass
    return int(os.environ.get("RANK", "0"))


def refuse_bad_input(program: str, run: Callable[[], T]) -> T:
    """Runs ``run()``; a user error becomes ``<program>: error: <message>`` on stderr and exit code 2."""
    try:
        return run()
    except USER_ERRORS as error:
        if os.environ.get("OPDLM_DEBUG"):
            raise
        if _global_rank() == 0:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
