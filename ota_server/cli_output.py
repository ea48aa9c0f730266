"""An output file reserved before the work that fills it, so a command never does the work and then fails to save.

``edgeota device provision --out agent.toml`` registers a device whose credentials are shown once: if the file then
could not be written, the device would stay registered with credentials nobody has. :class:`ReservedFile`
creates a temporary file beside the target first (proving the folder exists or can be made and is writable,
and reserving some disk space); the command then registers, writes into the reservation and renames it over the
target. Imports only the standard library and the contract.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from types import TracebackType

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

RESERVE_BYTES = 256 * 1024
"""Disk space claimed up front (an agent.toml with keys and a TUF root is a few kB): a full disk fails here."""


class OutputError(EdgeotaError):
    """The output path cannot be written (one line, naming the path and the reason)."""

    default_reason = ReasonCode.MALFORMED_MESSAGE


class ReservedFile:
    """A temporary file in ``target``'s folder, created (mode ``mode``) by the constructor.

    Use as a context manager: leaving the block without :meth:`commit` removes the temporary file and leaves
    ``target`` as it was.

    Raises:
        OutputError: ``target`` is a folder, its parent cannot be created, or the folder is not writable.
    """

    def __init__(self, target: Path, mode: int = 0o600) -> None:
        self.target = target
        if target.is_dir():
            raise OutputError(f"cannot write {target}: it is a folder")
        # Folders this reservation creates, deepest first: removed again when nothing is committed.
        self._created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"cannot write {target}: {_why(exc)}") from None
        with contextlib.suppress(OSError, AttributeError):  # not every file system can: then the write may fail
            os.posix_fallocate(self._fd, 0, RESERVE_BYTES)

    def commit(self, text: str) -> None:
        """Write ``text`` and rename the file over the target.

        Raises:
            OutputError: the write or the rename failed (the temporary file is removed).
        """
        assert self._fd is not None, "commit() called twice"
        data = text.encode("utf-8")
        try:
            fd, self._fd = self._fd, None
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.truncate(len(data))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.target)
        except OSError as exc:
            self.discard()
            raise OutputError(f"cannot write {self.target}: {_why(exc)}") from None
        self._created = []

    def discard(self) -> None:
        """Remove the temporary file (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self.tmp.unlink(missing_ok=True)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created = []

    def __enter__(self) -> ReservedFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
