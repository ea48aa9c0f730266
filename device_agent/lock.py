"""One agent per state folder, enforced with an exclusive ``fcntl`` lock on ``agent.lock``.

The lock belongs to the open file description, so it is released when the process dies
(even by ``kill -9``); a stale lock file never blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

LOCK_FILE = "agent.lock"


class AgentLockedError(EdgeotaError):
    """Another agent already runs on this state folder."""

    default_reason = ReasonCode.INTERNAL_ERROR


class StateDirLock:
    """Hold the state folder's lock while open. Not re-entrant: one holder per folder."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`AgentLockedError` (naming the holder's pid) at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise AgentLockedError(
                f"another edgeota agent (pid {holder}) already uses state folder {self.path.parent}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
