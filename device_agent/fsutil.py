"""Small crash-safe file helpers: atomic replace with fsync, folder fsync, free-space probe."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

FreeSpaceProbe = Callable[[Path], int]
"""Returns the bytes free on the file system holding a path; injectable so tests can fake a full disk."""


def disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader (or a reboot) sees the old or the new bytes, never a mix.

    Writes a temporary file in the same folder, fsyncs it, renames it over ``path`` and fsyncs
    the folder so the rename itself is durable.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a folder (or file) if present, then fsync its parent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    if path.parent.exists():
        fsync_dir(path.parent)
