"""Batched device-message ingest: a bounded queue per writer thread, one transaction per batch.

The MQTT network thread only parses the topic and hands ``(device, channel, payload)`` to
:meth:`IngestWriters.submit`. The device id picks the writer (a stable hash), so one device's
messages are applied in the order the broker delivered them. When a writer's queue is full,
``submit`` blocks: paho stops reading, the broker queues for the server's session and the devices
keep their unacknowledged reports; nothing is dropped.

This is the only ingest path. A writer takes up to ``ingest_batch_max`` messages (whatever is
queued, without waiting for more; a setting of 0 is read as 1) and :func:`apply_batch` applies them
in ONE unit of work (:func:`ota_server.rollout.unit_of_work.unit_of_work`). The first pass uses no savepoints; if any
message fails (or the commit does), the batch is rolled back and re-applied with a SAVEPOINT per
message, so a bad or conflicting message is undone alone. Only after the commit does it
acknowledge (one ``Ack`` per device per batch), publish the deployments the batch caused and
count each outcome in ``ctx.metrics``. If no pass commits, nothing of the batch is acknowledged
and the devices re-send (the server deduplicates).

SQLite has one writer with its own engine whose transactions start with ``BEGIN IMMEDIATE``: the
driver otherwise defers ``BEGIN`` to the first write, and a savepoint opened before it would turn
its ``RELEASE`` into a commit. PostgreSQL gets ``ingest_workers`` writers (default 2).
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from edgeota_contract.errors import ContractError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Presence, parse_device_message
from edgeota_contract.topics import Channel, parse_device_topic
from ota_server.context import ServerContext
from ota_server.core.unstorable import json_body_problem
from ota_server.db import make_engine, make_sessionmaker
from ota_server.rollout.unit_of_work import unit_of_work
from ota_server.services import ingest, ingest_prefetch
from ota_server.services.telemetry_aggregates import AggregationConfig

log = logging.getLogger("edgeota.server.ingest")
CAREFUL_ATTEMPTS = 2  # savepoint-per-message passes after a failed fast pass
QUEUE_DEPTH = "ingest_queue_depth"
"""A gauge kept in the counters (+1 queued, -n taken): the core's counters reach the API workers, so
``/metrics`` reads the writers' queue depth in any process."""


@dataclass(frozen=True)
class Incoming:
    """One device message as received: the topic's device id and channel, and the raw payload."""

    topic: str
    device_id: str
    channel: Channel
    payload: bytes


class IngestQueue:
    """A bounded FIFO (messages and payload bytes); ``put`` blocks while it is full.

    A single payload larger than ``max_bytes`` is still accepted into an empty queue, so no message
    can wait forever. After :meth:`close`, ``put`` returns False at once (and wakes blocked callers).
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._items: deque[Incoming] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.closed = False
        self.blocked_puts = 0

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def _full(self, size: int) -> bool:
        return len(self._items) >= self.max_items or (bool(self._items) and self._bytes + size > self.max_bytes)

    def put(self, item: Incoming) -> bool:
        """Append ``item``, waiting while the queue is full; False (not queued) once the queue is closed."""
        size = len(item.payload)
        with self._cond:
            if self._full(size) and not self.closed:
                self.blocked_puts += 1
                while self._full(size) and not self.closed:
                    self._cond.wait()
            if self.closed:
                return False
            self._items.append(item)
            self._bytes += size
            if len(self._items) == 1:
                # Only the writer waits for items, and only on an empty queue (putters wait only on a full,
                # so non-empty, one): no other put can have someone to wake.
                self._cond.notify_all()
            return True

    def take(self, max_items: int, timeout: float) -> list[Incoming]:
        """Up to ``max_items`` queued messages, oldest first; waits up to ``timeout`` s for the first one."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._bytes -= sum(len(i.payload) for i in batch)
            if batch:
                self._cond.notify_all()
            return batch

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def clear(self) -> int:
        """Drop everything still queued (never acknowledged, so the devices re-send it); returns how many."""
        with self._cond:
            n = len(self._items)
            self._items.clear()
            self._bytes = 0
            self._cond.notify_all()
            return n


def writer_sessions(ctx: ServerContext) -> tuple[sessionmaker[Session], Engine | None]:
    """Sessions for the writers, and the engine to dispose of afterwards (None: the context's own)."""
    url = ctx.settings.resolved_database_url
    if not url.startswith("sqlite"):
        return ctx.sessions, None
    engine = make_engine(url)

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return make_sessionmaker(engine), engine


def _parse(ctx: ServerContext, item: Incoming) -> ingest_prefetch.DeviceMessageT | str:
    """The parsed message, or the outcome label that drops it (``rate_limited``, ``malformed``)."""
    if ctx.limiter is not None and not ctx.limiter.allow(item.device_id, time.monotonic()):
        return "rate_limited"  # not acked: the device keeps the message and re-sends it later
    try:
        message = parse_device_message(item.channel, item.payload)
    except ContractError as exc:
        log_event(log, "ingest_malformed", logging.WARNING, topic=item.topic, error=str(exc))
        return "malformed"
    if json_body_problem(item.payload):  # NUL or a lone surrogate: no database stores it; never "error"
        log_event(log, "ingest_malformed", logging.WARNING, topic=item.topic, error="text that cannot be stored")
        return "malformed"
    return message


@dataclass
class _Applied:
    outcome: str
    ack: list[str]
    send: list[str]


class _RedoCarefully(Exception):
    """A message failed in the fast pass: roll the batch back and apply it with a savepoint per message."""


def _apply_one(
    session: Session,
    item: Incoming,
    message: ingest_prefetch.DeviceMessageT,
    known: ingest_prefetch.Known,
    careful: bool,
) -> _Applied:
    """Apply one message; ``careful``: inside its own savepoint, so an error undoes only this message.

    Fast pass (not ``careful``): any error but ``UnknownDevice`` (raised before a handler writes
    anything) aborts the pass with :class:`_RedoCarefully`.
    """
    try:
        if careful:
            with session.begin_nested():
                result = ingest.apply_message(session, item.device_id, message, known)
        else:
            result = ingest.apply_message(session, item.device_id, message, known)
    except ingest.UnknownDevice:
        return _Applied("unknown_device", [], [])
    except Exception as exc:
        if not careful:
            raise _RedoCarefully from exc
        if ingest.is_integrity_error(exc) and not isinstance(message, Presence):
            # A concurrent copy (another server process) stored it first: it is stored, so ack it.
            return _Applied("duplicate", [message.msg_id], [])
        log_event(log, "ingest_error", logging.ERROR, topic=item.topic, error=repr(exc))
        return _Applied("error", [], [])
    known.remember(item.device_id, message)
    return _Applied(result.ignored or "ok", result.ack, result.send)


def _apply_all(
    ctx: ServerContext,
    sessions: sessionmaker[Session],
    parsed: list[tuple[int, Incoming, ingest_prefetch.DeviceMessageT]],
    careful: bool,
) -> list[_Applied]:
    """One unit of work for the whole batch: apply, commit, then ack and publish (raises if it did not commit)."""
    with unit_of_work(ctx, sessions, lock=False) as unit:
        known = ingest_prefetch.prefetch(
            unit.session,
            [(item.device_id, msg) for _, item, msg in parsed],
            lookups=not careful,
            aggregation=aggregation(ctx),
            bulk_windows=not careful,
        )
        applied = [_apply_one(unit.session, item, msg, known, careful) for _, item, msg in parsed]
        ingest_prefetch.flush_windows(unit.session, known)  # the fast pass's window rows, one statement
        ingest_prefetch.flush_aggregates(unit.session, known)  # the batch's telemetry aggregates, same transaction
        for (_, item, _), result in zip(parsed, applied, strict=True):
            unit.outbox.ack(item.device_id, result.ack)
            unit.outbox.deployments.extend(result.send)
    return applied


def aggregation(ctx: ServerContext) -> AggregationConfig:
    """How this server groups telemetry windows into aggregates (its settings)."""
    return AggregationConfig.from_settings(ctx.settings)


def apply_batch(ctx: ServerContext, sessions: sessionmaker[Session], batch: list[Incoming]) -> list[str]:
    """Apply ``batch`` in one transaction, then ack, publish and count; returns each message's outcome.

    The fast pass applies every message without savepoints (they were half the statements on
    PostgreSQL). If any message fails, or the commit does (a conflicting insert), the transaction is
    rolled back and the batch re-applied with a SAVEPOINT per message, so only the bad message is
    lost; that careful pass is tried twice. Never raises. Acks and deployments go out only after a
    commit; when no pass commits, every outcome is ``error`` and nothing is acknowledged.
    """
    outcomes: list[str] = []
    parsed: list[tuple[int, Incoming, ingest_prefetch.DeviceMessageT]] = []
    for item in batch:
        message = _parse(ctx, item)
        outcomes.append(message if isinstance(message, str) else "")
        if not isinstance(message, str):
            parsed.append((len(outcomes) - 1, item, message))
    applied: list[_Applied] = [_Applied("error", [], []) for _ in parsed]
    for attempt, careful in enumerate((False, *[True] * CAREFUL_ATTEMPTS), start=1):
        try:
            applied = _apply_all(ctx, sessions, parsed, careful)
            break
        except Exception as exc:
            error = repr(exc.__cause__ if isinstance(exc, _RedoCarefully) else exc)
            if careful:
                ctx.metrics.inc("ingest_batch_failed")
                log_event(log, "ingest_batch_failed", logging.ERROR, attempt=attempt, size=len(parsed), error=error)
            else:
                ctx.metrics.inc("ingest_batch_redone")
                log_event(log, "ingest_batch_redo", logging.INFO, size=len(parsed), error=error)
    for (index, _, _), result in zip(parsed, applied, strict=True):
        outcomes[index] = result.outcome
    for outcome, item in zip(outcomes, batch, strict=True):
        if outcome not in ("ok", "error", "malformed"):  # errors and malformed ones are logged where found
            level = logging.WARNING if outcome in ("unknown_device", "rate_limited") else logging.INFO
            log_event(log, f"ingest_{outcome}", level, topic=item.topic)
    for outcome, count in Counter(outcomes).items():  # one locked increment per outcome, not per message
        ctx.metrics.inc(f"ingest_{outcome}", count)
    ctx.metrics.inc("ingest_batches")
    return outcomes


def receive(ctx: ServerContext, topic: str, payload: bytes) -> Incoming | None:
    """The message as a writer takes it, or None (counted) for a topic that is not a device report channel."""
    try:
        device_id, channel = parse_device_topic(topic)
    except ContractError as exc:
        ctx.metrics.inc("ingest_malformed")
        log_event(log, "ingest_malformed", logging.WARNING, topic=topic, error=str(exc))
        return None
    if channel == Channel.CMD:
        ctx.metrics.inc("ingest_ignored_cmd")
        return None
    return Incoming(topic, device_id, channel, payload)


@functools.cache
def freeze_startup_heap() -> None:
    """Collect, then move every object alive into the collector's permanent generation (once per process).

    A batch keeps its parsed messages until its commit, so each batch moves thousands of objects into the
    oldest generation and, every few batches, sets off a full collection, which walked every object of the
    process (modules, the app, the ORM's mappers): a fifth of the writers' CPU on batches of 200 telemetry
    windows (``bench/telemetry_bench.py``). Frozen objects are still freed by reference counting; only a cycle
    among them that becomes garbage later is kept (what exists when the writers start lives as long as the
    process anyway).
    """
    gc.collect()
    gc.freeze()


class IngestWriters:
    """``workers`` writer threads, each with its own bounded queue; a device always maps to the same one."""

    def __init__(self, ctx: ServerContext) -> None:
        s = ctx.settings
        self.ctx = ctx
        self.batch_max = max(1, s.ingest_batch_max)  # 0 once chose a per-message path that is gone
        self.queues = [
            IngestQueue(s.ingest_queue_max, s.ingest_queue_max_bytes) for _ in range(s.resolved_ingest_workers)
        ]
        self.sessions: sessionmaker[Session] = ctx.sessions
        self._engine: Engine | None = None
        self._threads: list[threading.Thread] = []
        self._abandon_at: float | None = None

    def start(self) -> None:
        freeze_startup_heap()
        self.sessions, self._engine = writer_sessions(self.ctx)
        for i, q in enumerate(self.queues):
            thread = threading.Thread(target=self._run, args=(q,), name=f"ingest-writer-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log_event(log, "ingest_writers_started", workers=len(self.queues), batch_max=self.batch_max)

    def submit(self, topic: str, payload: bytes) -> bool:
        """Queue one received message (blocks while its writer's queue is full); False if dropped.

        A topic that is not a device report channel is counted and dropped here; after :meth:`stop`
        messages are not queued (nor acknowledged: the devices re-send them).
        """
        item = receive(self.ctx, topic, payload)
        if item is None:
            return False
        q = self.queues[zlib.crc32(item.device_id.encode()) % len(self.queues)]
        waits = q.blocked_puts  # only this (network) thread puts, so the difference is this call's
        self.ctx.metrics.inc(QUEUE_DEPTH)  # before the put: the writer may take it (and count it out) at once
        queued = q.put(item)
        if q.blocked_puts != waits:
            self.ctx.metrics.inc("ingest_backpressure_waits")
        if not queued:
            self.ctx.metrics.inc(QUEUE_DEPTH, -1)
            self.ctx.metrics.inc("ingest_abandoned")
        return queued

    def queued(self) -> int:
        return sum(len(q) for q in self.queues)

    def _run(self, q: IngestQueue) -> None:
        while True:
            if self._abandon_at is not None and time.monotonic() >= self._abandon_at:
                return  # stop() drops what is left
            batch = q.take(self.batch_max, 0.5)
            if batch:
                self.ctx.metrics.inc(QUEUE_DEPTH, -len(batch))
                try:
                    apply_batch(self.ctx, self.sessions, batch)
                except Exception as exc:  # pragma: no cover - apply_batch catches; the writer must not die
                    self.ctx.metrics.inc("ingest_error", len(batch))
                    log_event(log, "ingest_writer_error", logging.ERROR, error=repr(exc))
            elif q.closed:
                return

    def stop(self, drain_seconds: float = 5.0) -> int:
        """Stop taking messages, apply what is queued for up to ``drain_seconds``, abandon the rest.

        Returns how many queued messages were abandoned (never acknowledged: the devices re-send them).
        """
        self._abandon_at = time.monotonic() + drain_seconds
        for q in self.queues:
            q.close()
        for thread in self._threads:
            thread.join(timeout=drain_seconds + 30)  # a batch under way finishes (or times out) first
        abandoned = sum(q.clear() for q in self.queues)
        self.ctx.metrics.inc("ingest_abandoned", abandoned)
        self.ctx.metrics.inc(QUEUE_DEPTH, -abandoned)
        if self._engine is not None:
            self._engine.dispose()
        log_event(log, "ingest_writers_stopped", abandoned=abandoned)
        return abandoned
