"""One unit of work for every change of rollouts and deployments: lock, apply, commit, then dispatch.

The engine tick, the API's rollout commands and the ingest writers all run their changes inside
:func:`unit_of_work`. Effects are applied to rows in one transaction, and what must reach devices
(assignments, ``shadow_stop`` commands, acks) is collected in an :class:`Outbox`, not sent. Audit
rows are written inside the transaction. Guarantees:

- Nothing in the outbox is published unless the transaction committed: if the work or the commit
  raises, the exception propagates and nothing is sent.
- Before the commit, every pending deployment in the outbox is marked ``notified`` with a fresh
  assignment id, so what is published is exactly what was committed; a publish lost after the
  commit is repaired by the device's next check-in (it re-sends every open deployment).
- A failure to publish after the commit is logged, never raised: stored is stored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from edgeota_contract.logs import log_event
from edgeota_contract.states import DeploymentState
from ota_server.context import ServerContext
from ota_server.models import Deployment, Rollout, utcnow
from ota_server.rollout.records import mark_notified
from ota_server.services.dispatch import publish_deployments, send_ack, send_shadow_stops

log = logging.getLogger("edgeota.server.rollout")

ROLLOUT_LOCK = threading.RLock()
"""Serialises rollout changes inside one process (SQLite has no row locks; on PostgreSQL
:func:`lock_rollout` also takes a ``FOR UPDATE`` row lock, which covers several processes)."""


@dataclass
class Outbox:
    """What to send once the unit of work has committed."""

    deployments: list[str] = field(default_factory=list)
    """Deployment ids whose assignment to publish."""
    shadow_stops: list[tuple[str, str]] = field(default_factory=list)
    """(device, model) pairs to send ``shadow_stop``."""
    acks: dict[str, list[str]] = field(default_factory=dict)
    """Per device, the msg ids of its reports to acknowledge."""

    def ack(self, device_id: str, msg_ids: list[str]) -> None:
        if msg_ids:
            self.acks.setdefault(device_id, []).extend(msg_ids)

    def __bool__(self) -> bool:
        return bool(self.deployments or self.shadow_stops or self.acks)


@dataclass
class Unit:
    """The open unit of work: its session (inside a transaction) and its outbox."""

    session: Session
    outbox: Outbox

    def mark_sends(self) -> None:
        """Mark the outbox's pending deployments ``notified`` now (the commit does it anyway), so that
        what the unit reads back (a status answer) shows what will have been committed and sent."""
        _mark_sends(self.session, self.outbox)


def lock_rollout(session: Session, rollout_id: str) -> Rollout | None:
    """Load ``rollout_id`` for a change, serialised against other processes changing it.

    PostgreSQL takes a ``FOR UPDATE`` row lock. SQLite has none, so a no-op write first takes the
    database's write lock: with several server processes (``--workers``), the engine and a manual
    command then never decide on the same stale state. Call it first in its transaction.
    """
    if session.get_bind().dialect.name == "sqlite":
        session.execute(update(Rollout).where(Rollout.id == rollout_id).values(current_stage=Rollout.current_stage))
    return session.scalar(select(Rollout).where(Rollout.id == rollout_id).with_for_update())


def _mark_sends(session: Session, outbox: Outbox) -> None:
    ids = set(outbox.deployments)
    if not ids:
        return
    now = utcnow()
    pending = session.scalars(
        select(Deployment).where(Deployment.id.in_(ids), Deployment.state == DeploymentState.PENDING.value)
    )
    for dep in pending:
        mark_notified(dep, now)


@contextmanager
def unit_of_work(
    ctx: ServerContext, sessions: sessionmaker[Session] | None = None, lock: bool = True
) -> Iterator[Unit]:
    """Open a transaction (under :data:`ROLLOUT_LOCK` unless ``lock`` is False); commit, then dispatch.

    ``sessions``: another session factory (the SQLite ingest writer's). The body applies effects
    through :mod:`ota_server.rollout.apply` and fills ``unit.outbox``. Raises whatever the body or
    the commit raises, and then sends nothing.
    """
    outbox = Outbox()
    with ROLLOUT_LOCK if lock else nullcontext(), (sessions or ctx.sessions)() as session, session.begin():
        yield Unit(session, outbox)
        _mark_sends(session, outbox)
    dispatch(ctx, outbox)


def dispatch(ctx: ServerContext, outbox: Outbox) -> None:
    """Publish a committed unit's outbox: acks, assignments, shadow stops. Logs failures, never raises."""
    try:
        for device_id, msg_ids in outbox.acks.items():
            send_ack(ctx, device_id, msg_ids)
        if outbox.deployments:
            publish_deployments(ctx, outbox.deployments)
        if outbox.shadow_stops:
            send_shadow_stops(ctx, outbox.shadow_stops)
    except Exception as exc:  # a lost send is repaired by the device's next check-in (or re-sent report)
        log_event(log, "dispatch_failed", logging.ERROR, error=repr(exc))
