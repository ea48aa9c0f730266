"""The rollout engine loop: one tick every ``engine_tick_seconds``, only while holding the lease.

The lease is a row in ``engine_lease`` (works on SQLite and PostgreSQL alike): a process may
act only while its unexpired lease is in the database, so with several server processes one
engine acts at a time. Every decision comes from the pure :mod:`ota_server.rollout.engine_logic`
over state read from the database, so a restarted server resumes exactly where it stopped.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from edgeota_contract.logs import log_event
from edgeota_contract.states import RolloutState
from ota_server.context import ServerContext
from ota_server.models import EngineLease, Rollout, utcnow
from ota_server.rollout import engine_logic as el
from ota_server.services import rollouts as svc
from ota_server.services.deployments import take_shadow_stops
from ota_server.services.dispatch import send_pending, send_shadow_stops
from ota_server.services.telemetry import rollout_telemetry_failure

log = logging.getLogger("edgeota.server.engine")
LEASE_NAME = "rollout-engine"


def acquire_lease(ctx: ServerContext, holder: str) -> bool:
    """Take or renew the engine lease; True when ``holder`` owns it until now + lease seconds."""
    now = utcnow()
    until = now + timedelta(seconds=ctx.settings.engine_lease_seconds)
    with ctx.sessions() as session, session.begin():
        result = session.execute(
            update(EngineLease)
            .where(EngineLease.name == LEASE_NAME)
            .where((EngineLease.holder == holder) | (EngineLease.expires_at < now))
            .values(holder=holder, expires_at=until)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if session.get(EngineLease, LEASE_NAME) is not None:
            return False
    try:
        with ctx.sessions() as session, session.begin():
            session.add(EngineLease(name=LEASE_NAME, holder=holder, expires_at=until))
        return True
    except IntegrityError:
        return False


def release_lease(ctx: ServerContext, holder: str) -> None:
    with ctx.sessions() as session, session.begin():
        lease = session.get(EngineLease, LEASE_NAME)
        if lease is not None and lease.holder == holder:
            lease.expires_at = utcnow() - timedelta(seconds=1)


def tick(ctx: ServerContext, actor: str = "engine") -> int:
    """Run every running rollout one step; returns the number of effects applied."""
    applied = 0
    with svc.ROLLOUT_LOCK, ctx.sessions() as session, session.begin():
        applied += len(svc.start_due(session, utcnow(), actor))
    with ctx.sessions() as session:
        ids = list(session.scalars(select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value)))
    for rollout_id in ids:
        to_send: list[str] = []
        stops: list[tuple[str, str]] = []
        with svc.ROLLOUT_LOCK, ctx.sessions() as session, session.begin():
            rollout = svc.lock_rollout(session, rollout_id)
            if rollout is None or rollout.state != RolloutState.RUNNING.value:
                continue
            now = utcnow()
            telemetry_failure = rollout_telemetry_failure(session, ctx.store, rollout)
            # Effects describe state, so loop until the rollout is stable within this tick.
            for _ in range(10):
                effects = el.decide(svc.load_view(session, rollout, telemetry_failure), now)
                if not effects:
                    break
                applied += len(effects)
                to_send.extend(svc.apply_effects(session, rollout, effects, actor, now))
                session.flush()
                if any(isinstance(e, el.Assign | el.Retry | el.StartSoak | el.TimeOut) for e in effects):
                    break
            stops = take_shadow_stops(session)
        if to_send:
            send_pending(ctx)
        send_shadow_stops(ctx, stops)
    # Also whatever a crash left pending between its commit and its publish.
    send_pending(ctx)
    return applied


class EngineLoop:
    """Background thread running :func:`tick` while it holds the lease."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.holder = f"engine-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.is_leader = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.is_leader:
            try:
                release_lease(self.ctx, self.holder)
            except Exception as exc:
                log_event(log, "lease_release_failed", logging.WARNING, error=repr(exc))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.is_leader = acquire_lease(self.ctx, self.holder)
                if self.is_leader:
                    tick(self.ctx)
            except Exception as exc:  # the loop must survive a database hiccup
                log_event(log, "engine_tick_failed", logging.ERROR, error=repr(exc))
            self._stop.wait(self.ctx.settings.engine_tick_seconds)
