"""fsync by path: how the filesystem blob store and the SQLite index make what they
wrote durable before the store path acknowledges it (invariant 1)."""

from __future__ import annotations

import os


def sync_path(path: str | os.PathLike[str], *, data_only: bool = False) -> None:
    """fsync (or fdatasync) the file or directory at ``path``; OSError if it failed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if data_only:
            os.fdatasync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)
