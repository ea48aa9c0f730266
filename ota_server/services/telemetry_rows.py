"""Telemetry window rows written in bulk: one statement per ingest batch, not one ORM object per window.

The batch writers' fast pass (:mod:`ota_server.ingest_queue`) stages each new window as a plain row
(:func:`window_row`) and :func:`insert_window_rows` writes all of them in the batch's transaction, before the
batch's aggregates: on PostgreSQL with ``COPY`` (no SQL text to build or parse per row), on SQLite with one
``executemany``. The payload is the window's JSON as pydantic serialises it (``model_dump_json``, the same
document ``model_dump(mode="json")`` gives, without building it in Python and encoding it again).

Guarantees: the rows are plain inserts, so the ``(device_id, boot_id, seq)`` unique constraint still rejects
a window another transaction stored meanwhile; the error aborts the batch's transaction and the caller redoes
it message by message (the careful pass), where that copy is found stored and counted as a duplicate.
Non-finite floats (a feature's ``min`` of NaN) are stored as ``null`` by both passes (the careful pass's ORM
rows take :func:`window_payload`, the same document): JSON has no NaN, and PostgreSQL refused a document holding
one, so such a window was never stored there and its device re-sent it for ever.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import JSON, Dialect, Table, bindparam, insert
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeDecorator

from edgeota_contract.messages import TelemetryWindow
from ota_server.models import TelemetryRecord

COLUMNS = (
    "device_id",
    "boot_id",
    "seq",
    "model_name",
    "version",
    "bundle_sha256",
    "window_start",
    "window_end",
    "request_count",
    "error_count",
    "payload",
)


class SerializedJSON(TypeDecorator[str]):
    """A JSON column's value given as its serialised text: bound as is (no second encoding), typed as JSON."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Dialect) -> None:
        return None


_INSERT = insert(cast(Table, TelemetryRecord.__table__)).values(
    {name: bindparam(name, type_=SerializedJSON()) if name == "payload" else bindparam(name) for name in COLUMNS}
)


def window_columns(device_id: str, window: TelemetryWindow) -> dict[str, Any]:
    """The ``telemetry_windows`` columns of one window sent by ``device_id`` (identity from the topic), but its
    payload."""
    return {
        "device_id": device_id,
        "boot_id": window.boot_id,
        "seq": window.seq,
        "model_name": window.model_name,
        "version": window.version,
        "bundle_sha256": window.bundle_sha256,
        "window_start": window.window_start,
        "window_end": window.window_end,
        "request_count": window.request_count,
        "error_count": window.error_count,
    }


def window_payload(window: TelemetryWindow) -> dict[str, Any]:
    """The stored payload as a document (the ORM path): exactly what :func:`window_row` stores as text."""
    payload: dict[str, Any] = json.loads(window.model_dump_json())
    return payload


def window_row(device_id: str, window: TelemetryWindow) -> dict[str, Any]:
    """The whole ``telemetry_windows`` row of one window, its payload as serialised JSON text."""
    row = window_columns(device_id, window)
    row["payload"] = window.model_dump_json()
    return row


def insert_window_rows(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert ``rows`` (from :func:`window_row`) in the session's transaction; returns how many.

    Raises what the database raises (a unique violation for a window stored meanwhile): the caller's unit of
    work rolls the whole batch back.
    """
    if not rows:
        return 0
    if session.get_bind().dialect.name != "postgresql":
        session.execute(_INSERT, rows)
        return len(rows)
    session.flush()  # what the ORM holds goes first, as an execute() would autoflush it
    driver: Any = session.connection().connection.driver_connection  # psycopg's connection, in this transaction
    with driver.cursor() as cursor, cursor.copy(_COPY) as copy:
        for row in rows:
            copy.write_row([_utc(row[name]) if name in _TIMES else row[name] for name in COLUMNS])
    return len(rows)


_COPY = f"COPY telemetry_windows ({', '.join(COLUMNS)}) FROM STDIN"
_TIMES = frozenset({"window_start", "window_end"})


def _utc(value: datetime) -> datetime:
    """What the column's type binds (``ota_server.models.UTCDateTime``): aware, in UTC (naive read as UTC)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
