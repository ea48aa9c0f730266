"""Database engine, sessions and migrations (run programmatically with Alembic)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
ALEMBIC_INI = Path(__file__).parent / "alembic.ini"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys.

    SQLite keeps the driver's default of opening a transaction at the first write, so reads never
    hold the write lock and a write waits (busy timeout) instead of failing on a stale snapshot.
    """
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        # A server connection can drop while pooled; a local SQLite file cannot, so it skips the ping per checkout.
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> Config:
    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending migration (``alembic upgrade head``) on ``engine``'s database."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def is_at_head(engine: Engine) -> bool:
    """True when ``engine``'s database has every migration applied (a process that must not migrate checks it)."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(engine.url.render_as_string(hide_password=False)))
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == set(script.get_heads())


# PostgreSQL's deadlock_detected, serialization_failure and lock_not_available: the transaction was rolled back.
_RETRYABLE_SQLSTATES = frozenset({"40P01", "40001", "55P03"})


def is_transient_conflict(exc: BaseException) -> bool:
    """A database error that rolled the transaction back and goes away on retry (a deadlock, a serialization
    failure, SQLite's "database is locked")."""
    from sqlalchemy.exc import OperationalError

    if not isinstance(exc, OperationalError):
        return False
    if getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)


def retry_transient(fn: Callable[[], T], attempts: int = 4, delay: float = 0.05) -> T:
    """``fn()``, called again (up to ``attempts`` times, with a growing random pause) while it fails with a
    transient conflict. ``fn`` must run whole transactions of its own (a unit of work), so a retry repeats
    nothing that was kept. The last conflict is raised (the API answers it with 503 and Retry-After)."""
    import random
    import time

    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:
            if attempt == attempts - 1 or not is_transient_conflict(exc):
                raise
            time.sleep(delay * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")
