"""Outputs are checked before any work: of the right kind, writable, and apart from every input (an output
that is, contains or - when it is replaced whole - lies inside an input would destroy it)."""

from __future__ import annotations

import os
import tempfile
from typing import Iterable, Optional, Tuple

from .console import error_message


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
