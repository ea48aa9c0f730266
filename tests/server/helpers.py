"""In-process helpers: feed device messages to the ingest path and read the commands it sent.

Messages go through what production runs: :func:`ota_server.ingest_queue.receive` (the topic, as the
MQTT bridge hands it to the writers) and :func:`ota_server.ingest_queue.apply_batch` (what a writer
runs), one message per batch, with the writers' own sessions.
"""

from __future__ import annotations

import uuid
import weakref
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from edgeota_contract.messages import Ack, Assignment, CheckIn, RunningModel, StatusReport, verify_command
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.ingest_queue import apply_batch, receive, writer_sessions

BOOT = uuid.uuid4().hex
_writers: dict[int, sessionmaker[Session]] = {}


def _sessions(ctx: ServerContext) -> sessionmaker[Session]:
    """The writers' sessions for ``ctx`` (SQLite: their own engine, disposed with ``ctx``)."""
    key = id(ctx)
    if key not in _writers:
        sessions, engine = writer_sessions(ctx)
        _writers[key] = sessions
        weakref.finalize(ctx, _forget, key, engine)
    return _writers[key]


def _forget(key: int, engine: Any) -> None:
    _writers.pop(key, None)
    if engine is not None:
        engine.dispose()


def deliver(ctx: ServerContext, topic: str, payload: bytes) -> str:
    """Ingest one device message as the writers do; its outcome (``ok``, ``duplicate``, ``stale``...).

    A topic the writers refuse before queueing (not a device report channel) gives ``malformed``.
    """
    item = receive(ctx, topic, payload)
    if item is None:
        return "malformed"
    return apply_batch(ctx, _sessions(ctx), [item])[0]


def commands(ctx: ServerContext, device_id: str) -> list[Any]:
    """Every command sent to ``device_id`` so far, verified with the server key."""
    keys = TrustedKeys([ctx.server_key.public_key])
    sent = ctx.publisher.sent  # type: ignore[attr-defined]
    return [verify_command(p, keys, device_id) for d, p in sent if d == device_id]


def assignments(ctx: ServerContext, device_id: str) -> list[Assignment]:
    return [c for c in commands(ctx, device_id) if isinstance(c, Assignment)]


def acked(ctx: ServerContext, device_id: str) -> set[str]:
    return {m for c in commands(ctx, device_id) if isinstance(c, Ack) for m in c.msg_ids}


_seq = iter(range(1, 1_000_000))


def next_seq() -> int:
    """The next per-boot sequence number, as the device would take it for a message built now."""
    return next(_seq)


def status_report(
    a: Assignment, state: DeploymentState, reason: ReasonCode = ReasonCode.OK, msg_id: str | None = None
) -> StatusReport:
    """The device's report of ``a`` reaching ``state``, with the next seq of this test boot."""
    return StatusReport(
        boot_id=BOOT,
        seq=next(_seq),
        deployment_id=a.deployment_id,
        assignment_id=a.assignment_id,
        state=state,
        reason=reason,
        model_name=a.model_name,
        version=a.version,
        bundle_sha256=a.bundle_sha256,
        **({"msg_id": msg_id} if msg_id else {}),
    )


def report(
    ctx: ServerContext,
    a: Assignment,
    state: DeploymentState,
    reason: ReasonCode = ReasonCode.OK,
    device_id: str | None = None,
    msg_id: str | None = None,
) -> tuple[str, StatusReport]:
    msg = status_report(a, state, reason, msg_id)
    outcome = deliver(ctx, device_topic(device_id or a.device_id, Channel.STATUS), msg.model_dump_json().encode())
    return outcome, msg


def checkin_message(
    profile: str,
    models: list[Assignment] = (),  # type: ignore[assignment]
    active: str | None = None,
    seq: int | None = None,
    boot_id: str = BOOT,
    sent_at: datetime | None = None,
) -> CheckIn:
    """A check-in running ``models``' bundles (the next seq unless given)."""
    running = [
        RunningModel(
            model_name=a.model_name,
            version=a.version,
            bundle_sha256=a.bundle_sha256,
            release_counter=a.release_counter,
            slot="a",
        )
        for a in models
    ]
    return CheckIn(
        boot_id=boot_id,
        seq=next(_seq) if seq is None else seq,
        hardware_profile=profile,
        agent_version="t",
        models=running,
        active_deployment_id=active,
        **({"sent_at": sent_at} if sent_at is not None else {}),
    )


def checkin(
    ctx: ServerContext,
    device_id: str,
    profile: str,
    models: list[Assignment] = (),  # type: ignore[assignment]
    active: str | None = None,
    seq: int | None = None,
    boot_id: str = BOOT,
    sent_at: datetime | None = None,
) -> str:
    msg = checkin_message(profile, models, active, seq, boot_id, sent_at)
    return deliver(ctx, device_topic(device_id, Channel.CHECKIN), msg.model_dump_json().encode())


def finish(ctx: ServerContext, a: Assignment, ok: bool = True) -> None:
    for state in (DeploymentState.DOWNLOADING, DeploymentState.INSTALLING, DeploymentState.TRIAL):
        report(ctx, a, state)
    if ok:
        report(ctx, a, DeploymentState.COMMITTED)
    else:
        report(ctx, a, DeploymentState.ROLLED_BACK, ReasonCode.SMOKE_TEST_FAILED)
