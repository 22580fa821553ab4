"""Directories that appear whole or not at all: written into a temporary sibling on every rank, then
renamed into place by rank 0 (an old directory is replaced only after the new one is complete)."""

from __future__ import annotations

import os
import shutil

from ..runtime.distributed import barrier, broadcast_object, global_rank


def atomic_directory_save(directory: str, write) -> None:
    """Runs ``write(tmp_dir)`` on every rank, then moves ``tmp_dir`` to ``directory`` on rank 0.

    ``write`` must be a collective that fills the (empty, existing) temporary directory.
    """
    directory = os.path.abspath(directory)
    tag = broadcast_object(f"{os.getpid()}")
    tmp = f"{directory}.partial-{tag}"
    if global_rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
    barrier()
    try:
        write(tmp)
        barrier()
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if global_rank() == 0:
        old = None
        if os.path.exists(directory):
            old = f"{directory}.old-{tag}"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
