"""One writer per run directory: an exclusive ``flock`` on ``<dir>/.opdlm.lock``.

Two training runs on one run directory would interleave their ``metrics.jsonl`` records and overwrite
each other's checkpoints. A run takes this lock before it builds anything; a second run is refused
with one line naming the holder's pid and host. The kernel releases a ``flock`` when its process
dies, so a run killed with SIGKILL leaves no stale lock (the file stays, with the last holder's
description, and the next run simply takes it). Under torchrun only global rank 0 holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from typing import Dict, Optional

LOCK_FILE = ".opdlm.lock"

# locks this process holds, by directory: a second Trainer of the same process (tests, a resume in one
# script) shares it instead of refusing itself
_HELD: Dict[str, "RunDirectoryLock"] = {}


class RunDirectoryLock:
    """``acquire()`` creates ``directory`` if needed and takes the lock, or raises ValueError naming the
    holder; ``release()`` (or process exit) frees it."""

    def __init__(self, directory: str, what: str = "run directory") -> None:
        self.directory = os.path.realpath(directory)
        self.what = what
        self.path = os.path.join(self.directory, LOCK_FILE)
        self._fd: Optional[int] = None
        self._users = 0
        self._created_directory = self._created_file = False

    def acquire(self) -> "RunDirectoryLock":
        held = _HELD.get(self.directory)
        if held is not None:
            held._users += 1
            return held
        self._created_directory = not os.path.isdir(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        self._created_file = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ValueError(f"{self.what} {self.directory} is in use by {holder}; wait for that run to end or "
                                 f"choose another {self.what}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()} (since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        self._fd, self._users = fd, 1
        _HELD[self.directory] = self
        return self

    def release(self, remove_if_unused: bool = False) -> None:
        """Frees the lock (after its last user in this process). ``remove_if_unused`` (a run refused
        before it wrote anything): the lock file and the directory go too if this lock created them and
        nothing else was written there."""
        held = _HELD.get(self.directory)
        if held is None:
            return
        held._users -= 1
        if held._users > 0:
            return
        del _HELD[self.directory]
        if held._fd is not None:
            if remove_if_unused and held._created_file and os.listdir(held.directory) == [LOCK_FILE]:
                os.unlink(held.path)
                if held._created_directory:
                    os.rmdir(held.directory)
            fcntl.flock(held._fd, fcntl.LOCK_UN)
            os.close(held._fd)
            held._fd = None

    def __enter__(self) -> "RunDirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
