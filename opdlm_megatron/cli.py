"""What every command-line entry point shares; importable without torch, so ``--help`` starts at once.

* ``refuse_bad_input``: one way to refuse bad input - one line naming the problem
  (``<program>: error: ...``), exit code 2, no traceback, printed once (by global rank 0 under
  torchrun). ``OPDLM_DEBUG=1`` shows the traceback instead, for the rare case where a ValueError is
  a bug rather than bad input.
* ``argument_parser``: an ``argparse`` parser named after the console script the user typed (not
  ``generate.py`` or ``__main__.py``), with ``--verbose``.
* ``check_output``: before any work, an output path must be of the right kind, writable, and apart from
  every input (an output that is, contains or lies inside an input would destroy it).
* ``setup_console``: the screen shows the project's own lines, progress bars and errors; third-party
  logging and Python warnings go to the run's log file (``--verbose`` / ``OPDLM_DEBUG=1``: everything
  on the screen too).
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import re
import sys
import tempfile
import warnings
from typing import Callable, Iterable, Optional, Tuple, TypeVar

T = TypeVar("T")

# OSError: a missing or read-only path, a full disk, a file where a directory was expected ...
USER_ERRORS = (ValueError, OSError)
OUR_LOGGERS = ("opdlm_megatron", "__main__", "opdlm")


def global_rank() -> int:
    """The process's global rank: torch.distributed's once it is initialised, else torchrun's ``RANK``."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def error_message(error: BaseException) -> str:
    """The first line of an error, without ``[Errno N]`` noise."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror.lower()}{where}"
    text = str(error).strip()
    return re.sub(r"^\[Errno \d+\]\s*", "", text.splitlines()[0]) if text else type(error).__name__


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


# --------------------------------------------------------------------------------- outputs
def _within(path: str, root: str) -> bool:
    return path != root and os.path.commonpath([path, root]) == root


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _probe_writable(directory: str, flag: str, path: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".opdlm-write-check-", dir=directory)
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot write in {directory} ({error_message(error).split(':')[0]})") from None
    os.close(fd)
    os.unlink(name)


def check_output(path: str, flag: str, kind: str = "dir", inputs: Iterable[Tuple[str, Optional[str]]] = (),
                 replaces: bool = False) -> None:
    """Refuses, before any work, an output ``path`` (given as ``flag``) that cannot be created as ``kind``
    ("dir" or "file"), is not writable, or is or contains one of ``inputs`` (``(flag, path)`` pairs;
    symlinks resolved); with ``replaces`` (the output directory is replaced as a whole, as the
    converters do) also one that lies inside an input. Writes nothing (a probe file is removed at once)."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    if not path:
        raise ValueError(f"{flag} is empty")
    real = os.path.realpath(path)
    for input_flag, input_path in inputs:
        if not input_path:
            continue
        source = os.path.realpath(input_path)
        if real == source:
            raise ValueError(f"{flag} {path} is {input_flag} {input_path}: writing it would destroy the input; "
                             f"choose another {flag}")
        if replaces and _within(real, source):
            raise ValueError(f"{flag} {path} lies inside {input_flag} {input_path}: writing there would change the "
                             f"input; choose a {flag} outside it")
        if _within(source, real):
            raise ValueError(f"{flag} {path} contains {input_flag} {input_path}: replacing it would delete the "
                             f"input; choose another {flag}")
    if os.path.exists(real):
        if kind == "dir" and not os.path.isdir(real):
            raise ValueError(f"{flag} {path} exists and is not a directory")
        if kind == "file" and os.path.isdir(real):
            raise ValueError(f"{flag} {path} is a directory; give a file path")
    ancestor = _nearest_existing(os.path.dirname(real))
    if not os.path.isdir(ancestor):
        raise ValueError(f"{flag} {path}: {ancestor} is not a directory")
    _probe_writable(ancestor, flag, path)
    if kind == "dir" and os.path.isdir(real):
        _probe_writable(real, flag, path)


# --------------------------------------------------------------------------------- console
class _ConsoleFormatter(logging.Formatter):
    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name.split(".")[0] in OUR_LOGGERS
        source = "" if ours else f"[{record.name}] "
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"{self.program}: {level}{source}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _ours_or_error(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OUR_LOGGERS or record.levelno >= logging.ERROR


# torch's "torch" logger has its own stderr handler (installed when torch imports), so records of its
# children never reach the root handlers; these children talk on every start ("No CUDA runtime is
# found", checkpoint notes): a filter on each hands their records to the root handlers instead
_TORCH_CHATTY = ("torch.utils.cpp_extension", "torch.distributed", "torch.distributed.checkpoint",
                 "torch.distributed.elastic.multiprocessing.redirects")


class _ToRoot(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for handler in logging.getLogger().handlers:
            if record.levelno >= handler.level:
                handler.handle(record)
        return False


_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _handlers(kind: str):
    return [h for h in logging.getLogger().handlers if getattr(h, "_opdlm", None) == kind]


def setup_console(program: str, log_file: Optional[str] = None, verbose: bool = False) -> None:
    """The screen (stderr) shows the project's records and anyone's errors, prefixed ``<program>:``
    (ranks other than 0: errors only). Every record and Python warning also goes to ``log_file`` with
    its time and source; until ``attach_log_file`` names the file (a run knows it once it holds its run
    directory), the records wait in memory, and a run refused before that writes none."""
    verbose = verbose or bool(os.environ.get("OPDLM_DEBUG"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_opdlm", None):  # ours, from an earlier call (a test's capture handler stays)
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console._opdlm = "console"
    console.setFormatter(_ConsoleFormatter(program))
    if global_rank() != 0:
        console.setLevel(logging.ERROR)
    elif not verbose:
        console.addFilter(_ours_or_error)
    root.addHandler(console)
    pending = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    pending._opdlm = "pending"
    root.addHandler(pending)
    if log_file:
        attach_log_file(log_file)
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in _TORCH_CHATTY:
        chatty = logging.getLogger(name)
        if not any(isinstance(f, _ToRoot) for f in chatty.filters):
            chatty.addFilter(_ToRoot())


def attach_log_file(path: str) -> None:
    """Sends the records held since ``setup_console`` and all later ones to ``path`` (its folder is
    created). Does nothing when ``setup_console`` was not called (library use keeps its own logging)."""
    pending = _handlers("pending")
    if not pending:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    handler = logging.FileHandler(path)
    handler._opdlm = "file"
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    for buffer in pending:
        buffer.setTarget(handler)
        buffer.flush()
        logging.getLogger().removeHandler(buffer)
        buffer.close()
    logging.getLogger().addHandler(handler)
