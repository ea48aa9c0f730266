"""The rollout engine loop: one tick every ``engine_tick_seconds``, only while this process leads.

Leadership (:mod:`ota_server.engine_leader`) is a PostgreSQL advisory lock held on one connection
(taken over the moment its holder's connection ends) or, on SQLite, a lease row in ``engine_lease``
(taken over once it expires), so with several server processes one engine acts at a time. Every decision comes from the pure :mod:`ota_server.rollout.engine_logic`
over state read from the database, so a restarted server resumes exactly where it stopped. Each
rollout's step is one unit of work (:func:`ota_server.rollout.unit_of_work.unit_of_work`): lock,
decide and apply (:func:`ota_server.services.rollouts.advance`), commit, then send.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from edgeota_contract.logs import log_event
from edgeota_contract.states import DeploymentState, RolloutState
from ota_server.context import ServerContext
from ota_server.engine_leader import AdvisoryLockLeadership, Leadership, choose
from ota_server.models import Deployment, EngineLease, Rollout, utcnow
from ota_server.rollout.unit_of_work import lock_rollout, unit_of_work
from ota_server.services import rollouts as svc

log = logging.getLogger("edgeota.server.engine")
LEASE_NAME = "rollout-engine"


def acquire_lease(ctx: ServerContext, holder: str, name: str = LEASE_NAME, seconds: float | None = None) -> bool:
    """Take or renew the lease row ``name`` (default: the engine's); True when ``holder`` owns it until now +
    ``seconds`` (default ``engine_lease_seconds``)."""
    now = utcnow()
    until = now + timedelta(seconds=ctx.settings.engine_lease_seconds if seconds is None else seconds)
    with ctx.sessions() as session, session.begin():
        result = session.execute(
            update(EngineLease)
            .where(EngineLease.name == name)
            .where((EngineLease.holder == holder) | (EngineLease.expires_at < now))
            .values(holder=holder, expires_at=until)
        )
        if result.rowcount:  # type: ignore[attr-defined]
            return True
        if session.get(EngineLease, name) is not None:
            return False
    try:
        with ctx.sessions() as session, session.begin():
            session.add(EngineLease(name=name, holder=holder, expires_at=until))
        return True
    except IntegrityError:
        return False


def release_lease(ctx: ServerContext, holder: str) -> None:
    with ctx.sessions() as session, session.begin():
        lease = session.get(EngineLease, LEASE_NAME)
        if lease is not None and lease.holder == holder:
            lease.expires_at = utcnow() - timedelta(seconds=1)


class LeaseLeadership:
    """The ``engine_lease`` row as a :class:`ota_server.engine_leader.Leadership`."""

    kind = "lease"

    def __init__(self, ctx: ServerContext, holder: str) -> None:
        self.ctx, self.holder = ctx, holder

    def acquire(self) -> bool:
        return acquire_lease(self.ctx, self.holder)

    def release(self) -> None:
        release_lease(self.ctx, self.holder)


def make_leadership(ctx: ServerContext, holder: str) -> Leadership:
    """The configured leadership (``engine_leadership``). Raises ValueError for an advisory lock off PostgreSQL."""
    if choose(ctx.engine, ctx.settings.engine_leadership) == "advisory_lock":
        return AdvisoryLockLeadership(ctx.engine)
    return LeaseLeadership(ctx, holder)


def tick(ctx: ServerContext, actor: str = "engine") -> int:
    """Run every running rollout one step, each in its own unit of work; returns the number of effects applied."""
    applied = 0
    with unit_of_work(ctx) as unit:
        applied += len(svc.start_due(unit.session, utcnow(), actor, unit.outbox))
    with ctx.sessions() as session:
        ids = list(session.scalars(select(Rollout.id).where(Rollout.state == RolloutState.RUNNING.value)))
    for rollout_id in ids:
        with unit_of_work(ctx) as unit:
            rollout = lock_rollout(unit.session, rollout_id)
            if rollout is not None and rollout.state == RolloutState.RUNNING.value:
                applied += svc.advance(unit.session, ctx.store, rollout, actor, unit.outbox, ctx.metrics)
    send_pending(ctx)
    return applied


def send_pending(ctx: ServerContext) -> int:
    """Send every deployment still ``pending`` (left by a crash between a commit and its publish)."""
    with unit_of_work(ctx, lock=False) as unit:
        unit.outbox.deployments.extend(
            unit.session.scalars(select(Deployment.id).where(Deployment.state == DeploymentState.PENDING.value))
        )
        count = len(unit.outbox.deployments)
    return count


class EngineLoop:
    """Background thread running :func:`tick` while this process leads (see :func:`make_leadership`)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.holder = f"engine-{uuid.uuid4().hex[:12]}"
        self.leadership = make_leadership(ctx, self.holder)
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
                self.leadership.release()
            except Exception as exc:
                log_event(log, "lease_release_failed", logging.WARNING, error=repr(exc))
            self.is_leader = False

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                leading = self.leadership.acquire()
                if leading != self.is_leader:
                    log_event(log, "engine_leader" if leading else "engine_follower", way=self.leadership.kind)
                self.is_leader = leading
                if leading:
                    tick(self.ctx)
            except Exception as exc:  # the loop must survive a database hiccup
                self.is_leader = False
                log_event(log, "engine_tick_failed", logging.ERROR, error=repr(exc))
            self._stop.wait(self.ctx.settings.engine_tick_seconds)
