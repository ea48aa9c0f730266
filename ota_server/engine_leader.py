"""Which server process runs the rollout engine: one at a time, taken over when its holder dies.

Two ways, one interface (:class:`Leadership`: ``acquire()`` before every tick, ``release()`` on stop):

* :class:`AdvisoryLockLeadership` (PostgreSQL, the default there): a session-level
  ``pg_try_advisory_lock`` held on one dedicated connection. PostgreSQL releases it the moment that
  connection ends, so when the holder's process dies (kill -9, a crashed host whose TCP connection the
  server drops) another process takes over at its next tick, with no lease to run out. Every ``acquire``
  checks the connection is still alive (``SELECT 1``); a broken connection means the lock is lost, and
  the process stops acting until it wins the lock again.
* :class:`LeaseLeadership` (SQLite, or ``engine_leadership = "lease"``): a row in ``engine_lease`` renewed
  every tick; another process takes over once ``engine_lease_seconds`` pass without a renewal.

Neither is a fence on its own: a holder that lost leadership mid-tick may finish that tick. That is safe
because each rollout's step locks the rollout row (``SELECT ... FOR UPDATE`` on PostgreSQL) and the
engine's effects describe state, not increments (:mod:`ota_server.rollout.engine_logic`), so two steps of
the same rollout in a row change nothing the first did not.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine

from edgeota_contract.logs import log_event

log = logging.getLogger("edgeota.server.engine")
LOCK_NAME = "edgeota-rollout-engine"
# A stable signed 64-bit key for pg_try_advisory_lock, derived from the name (not a magic number).
ADVISORY_KEY = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8], "big", signed=True)


class Leadership(Protocol):
    kind: str

    def acquire(self) -> bool:
        """Take or keep leadership; True while this process may run the engine."""

    def release(self) -> None:
        """Give leadership up (on a clean stop), so another process takes over at once."""


class AdvisoryLockLeadership:
    """See the module docstring. Not thread-safe: one engine thread calls it."""

    kind = "advisory_lock"

    def __init__(self, engine: Engine, key: int = ADVISORY_KEY) -> None:
        self.engine = engine
        self.key = key
        self._conn: Connection | None = None

    def acquire(self) -> bool:
        if self._conn is not None:
            try:
                self._conn.execute(text("SELECT 1"))
                return True
            except Exception as exc:  # the connection (and with it the lock) is gone
                log_event(log, "engine_lock_lost", logging.WARNING, error=repr(exc)[:200])
                self._drop()
        conn = self.engine.connect()
        try:
            won = bool(conn.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
            conn.commit()  # end the implicit transaction; the session-level lock stays with the connection
        except Exception:
            conn.close()
            raise
        if not won:
            conn.close()
            return False
        self._conn = conn
        log_event(log, "engine_lock_acquired", key=self.key)
        return True

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            self._conn.commit()
        except Exception as exc:
            log_event(log, "engine_lock_release_failed", logging.WARNING, error=repr(exc)[:200])
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never hand this connection (or its lock) back to the pool
                conn.close()
            except Exception as exc:
                log_event(log, "engine_lock_close_failed", logging.DEBUG, error=repr(exc)[:200])


def choose(engine: Engine, setting: str) -> str:
    """``auto``: the advisory lock on PostgreSQL, the lease elsewhere; or the setting as given.

    Raises ValueError for ``advisory_lock`` on a database other than PostgreSQL.
    """
    postgres = engine.dialect.name == "postgresql"
    if setting == "advisory_lock" and not postgres:
        raise ValueError(f"engine_leadership = 'advisory_lock' needs PostgreSQL, not {engine.dialect.name}")
    if setting != "auto":
        return setting
    return "advisory_lock" if postgres else "lease"
