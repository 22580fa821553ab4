"""The screen a run shows: the project's own lines, progress bars and errors, prefixed with the command's
name; third-party logging and Python warnings go to the run's log file (``--verbose`` /
``OPDLM_DEBUG=1``: everything on the screen too). ``error_message`` is the one-line form of an error."""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
import warnings
from typing import Optional

from .distributed import global_rank

OUR_LOGGERS = ("opdlm_megatron", "__main__", "opdlm")


def error_message(error: BaseException) -> str:
    """The first line of an error, without ``[Errno N]`` noise."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        return f"{error.strerror.lower()}{where}"
    text = str(error).strip()
    return re.sub(r"^\[Errno \d+\]\s*", "", text.splitlines()[0]) if text else type(error).__name__


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
