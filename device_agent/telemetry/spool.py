"""A durable, bounded SQLite spool of telemetry windows waiting for the server's Ack.

Windows are kept in insertion order until :meth:`Spool.ack` names them. When full, the oldest
windows are dropped and counted (:attr:`Spool.dropped`, persisted), so the count can be reported
in ``TelemetryWindow.spool_dropped``. Safe to use from several threads of one agent.

The number of stored windows and the dropped count are also kept in memory (read once on open,
updated by every change), so an idle agent's retry tick and every closed window ask SQLite nothing.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path


class Spool:
    """Telemetry windows as (msg_id, payload) rows; survives restarts and power loss (WAL, synchronous=FULL)."""

    def __init__(self, path: Path, max_windows: int) -> None:
        self._max = max_windows
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS windows (id INTEGER PRIMARY KEY AUTOINCREMENT, msg_id TEXT UNIQUE NOT NULL,"
            " payload BLOB NOT NULL)"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        (count,) = self._db.execute("SELECT COUNT(*) FROM windows").fetchone()
        row = self._db.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()
        self._closed = False
        self._count = int(count)
        self._dropped = int(row[0]) if row else 0

    def add(self, msg_id: str, payload: bytes) -> int:
        """Store one window; returns how many old windows were dropped to make room."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO windows (msg_id, payload) VALUES (?, ?)", (msg_id, payload)
                )
                count = self._count + cur.rowcount
                drop = max(0, count - self._max)
                if drop:
                    self._db.execute(
                        "DELETE FROM windows WHERE id IN (SELECT id FROM windows ORDER BY id LIMIT ?)", (drop,)
                    )
                    self._db.execute(
                        "INSERT INTO meta (key, value) VALUES ('dropped', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = value + excluded.value",
                        (drop,),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._count = count - drop
            self._dropped += drop
            return int(drop)

    def oldest(self, limit: int, skip: Iterable[str] = ()) -> list[tuple[str, bytes]]:
        """Up to ``limit`` windows in the order they were added, leaving out ``skip``."""
        skipped = set(skip)
        out: list[tuple[str, bytes]] = []
        with self._lock:
            if self._count == 0 or self._closed:
                return out
            for msg_id, payload in self._db.execute("SELECT msg_id, payload FROM windows ORDER BY id"):
                if msg_id in skipped:
                    continue
                out.append((msg_id, bytes(payload)))
                if len(out) >= limit:
                    break
        return out

    def ack(self, msg_ids: Iterable[str]) -> int:
        """Delete acknowledged windows; returns how many were deleted (none once closed: a late Ack is
        harmless, the window is re-sent after the next start and the server deduplicates it)."""
        ids = list(msg_ids)
        if not ids:
            return 0
        with self._lock:
            if self._count == 0 or self._closed:
                return 0
            cur = self._db.executemany("DELETE FROM windows WHERE msg_id = ?", [(i,) for i in ids])
            self._count -= cur.rowcount
            return cur.rowcount

    @property
    def dropped(self) -> int:
        """Windows dropped to respect the bound, ever (persisted)."""
        return self._dropped

    def __len__(self) -> int:
        return self._count

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._db.close()
