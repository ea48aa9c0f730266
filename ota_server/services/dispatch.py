"""Turning deployments into server-signed commands and handing them to the publisher.

The database is the truth: a deployment is marked ``notified`` (with a fresh assignment id, by
:func:`ota_server.rollout.records.mark_notified`) and committed before its command is published
(:mod:`ota_server.rollout.unit_of_work` publishes only after its commit), so a lost publish is repaired by the device's
next check-in, which re-sends every open deployment.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.logs import log_event
from edgeota_contract.messages import Ack, Assignment, ShadowStop, new_id, sign_command, utcnow
from edgeota_contract.states import DeploymentState
from ota_server.context import ServerContext
from ota_server.models import Bundle, Deployment
from ota_server.rollout.records import mark_notified

log = logging.getLogger("edgeota.server.dispatch")


def prepare_sends(session: Session, deployments: list[Deployment]) -> list[str]:
    """Give each deployment a fresh assignment id and mark pending ones notified (caller commits)."""
    now = utcnow()
    for dep in deployments:
        mark_notified(dep, now)
    return [dep.id for dep in deployments]


def wire_mode(dep: Deployment) -> Literal["install", "rollback", "shadow"]:
    """The assignment's mode. An install the server permits below the device's release counter
    (``allow_downgrade``: a bandit arm older than the device's release) goes as ``rollback``, the contract's
    signed permission to install a lower counter."""
    if dep.mode == "rollback" or (dep.mode == "install" and dep.allow_downgrade):
        return "rollback"
    return "shadow" if dep.mode == "shadow" else "install"


def build_assignment(dep: Deployment, bundle: Bundle, ttl_seconds: float) -> Assignment:
    """The assignment command for ``dep`` (fresh nonce and expiry; the stored assignment id)."""
    now = utcnow()
    return Assignment(
        assignment_id=dep.assignment_id or new_id(),
        deployment_id=dep.id,
        rollout_id=dep.rollout_id,
        device_id=dep.device_id,
        mode=wire_mode(dep),
        model_name=dep.model_name,
        version=dep.version,
        release_counter=dep.release_counter,
        hardware_profile=bundle.hardware_profile,
        bundle_sha256=dep.bundle_sha256,
        bundle_size=bundle.size,
        bundle_url=f"/api/v1/artifacts/{dep.bundle_sha256}",
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
    )


def publish_deployments(ctx: ServerContext, deployment_ids: list[str]) -> int:
    """Sign and publish the (already committed) deployments; returns how many were handed over."""
    sent = 0
    with ctx.sessions() as session:
        for dep_id in deployment_ids:
            dep = session.get(Deployment, dep_id)
            if dep is None:
                continue
            bundle = session.get(Bundle, dep.bundle_sha256)
            if bundle is None:
                continue
            assignment = build_assignment(dep, bundle, ctx.settings.assignment_ttl_seconds)
            payload = sign_command(assignment, ctx.server_key)
            if ctx.publisher.publish_command(dep.device_id, payload):
                sent += 1
                ctx.metrics.inc("commands_published")
            log_event(
                log,
                "assignment_sent",
                device=dep.device_id,
                deployment=dep.id,
                mode=dep.mode,
                version=dep.version,
                assignment=assignment.assignment_id,
            )
    return sent


def poll_commands(ctx: ServerContext, device_id: str) -> list[dict[str, Any]]:
    """The signed assignments of ``device_id``'s open deployments, oldest first, as JSON objects.

    Each object is the document the MQTT bridge publishes on the device's command topic (a
    :class:`~edgeota_contract.messages.SignedCommand`): ``json.dumps(obj).encode()`` is a payload
    ``verify_command`` accepts. Serving a ``pending`` deployment marks it ``notified`` exactly as a
    publish does; a repeated poll serves the same deployments and assignment ids again, with a fresh
    nonce and expiry, and changes nothing in the database.
    """
    with ctx.sessions() as session, session.begin():
        open_deps = list(
            session.scalars(
                select(Deployment)
                .where(
                    Deployment.device_id == device_id,
                    Deployment.state.notin_([s.value for s in DeploymentState if s.terminal]),
                )
                .order_by(Deployment.created_at, Deployment.id)
            )
        )
        prepare_sends(session, [d for d in open_deps if d.state == DeploymentState.PENDING.value])
        for dep in open_deps:
            if dep.assignment_id is None:  # reconciled into progress without ever being sent
                dep.assignment_id = new_id()
        bundles = {
            b.sha256: b
            for b in session.scalars(select(Bundle).where(Bundle.sha256.in_({d.bundle_sha256 for d in open_deps})))
        }
        ttl = ctx.settings.assignment_ttl_seconds
        commands = [
            json.loads(sign_command(build_assignment(d, bundles[d.bundle_sha256], ttl), ctx.server_key))
            for d in open_deps
            if d.bundle_sha256 in bundles
        ]
    ctx.metrics.inc("commands_polled", len(commands))
    return commands


def send_shadow_stops(ctx: ServerContext, stops: list[tuple[str, str]]) -> None:
    """Tell each (device, model) to stop shadowing (after the commit that ended the shadow deployments)."""
    now = utcnow()
    for device_id, model_name in stops:
        stop = ShadowStop(
            device_id=device_id,
            model_name=model_name,
            issued_at=now,
            expires_at=now + timedelta(seconds=ctx.settings.assignment_ttl_seconds),
        )
        ctx.publisher.publish_command(device_id, sign_command(stop, ctx.server_key))
        log_event(log, "shadow_stop_sent", device=device_id, model=model_name)


def send_ack(ctx: ServerContext, device_id: str, msg_ids: list[str]) -> None:
    """Tell a device its reports are stored (call only after the commit)."""
    if not msg_ids:
        return
    now = utcnow()
    ack = Ack(
        device_id=device_id,
        msg_ids=msg_ids,
        issued_at=now,
        expires_at=now + timedelta(seconds=ctx.settings.assignment_ttl_seconds),
    )
    ctx.publisher.publish_command(device_id, sign_command(ack, ctx.server_key))
