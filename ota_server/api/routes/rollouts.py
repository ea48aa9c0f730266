"""Rollouts: create (or dry-run), commands, status."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from sqlalchemy import select

from ota_server.api.deps import CtxDep, Operator, ReleaseManager, SessionDep, Viewer
from ota_server.api.schemas import CommandBody, RolloutCreate, strategy_stages
from ota_server.core.problems import ApiError
from ota_server.core.security import Role
from ota_server.models import Rollout
from ota_server.rollout.engine_logic import Command, TransitionError
from ota_server.rollout.plan import Gates, Plan, Selector, Stage, Window
from ota_server.services import rollouts as svc
from ota_server.services.deployments import take_shadow_stops
from ota_server.services.dispatch import send_pending, send_shadow_stops
from ota_server.services.rollout_status import rollout_json, rollout_status

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])
_ID = r"^[A-Za-z0-9_-]{1,64}$"


@router.post("", status_code=201)
def create(body: RolloutCreate, ctx: CtxDep, session: SessionDep, who: ReleaseManager) -> JSONResponse:
    """Create a rollout (``dry_run`` only previews the stages; ``start`` starts it at once)."""
    try:
        stages = strategy_stages(body)
    except ValueError as exc:
        raise ApiError(422, "Unprocessable Content", str(exc)) from exc
    plan = Plan(
        stages=tuple(Stage(s.percent, s.count, s.soak_seconds, s.requires_approval) for s in stages),
        gates=Gates(**body.gates.model_dump()),
        on_failure=body.on_failure,
        windows=tuple(Window(*w.minutes()) for w in body.maintenance_windows),
        mode="shadow" if body.strategy == "shadow" else "install",
        max_retries=body.max_retries,
        retry_backoff_seconds=body.retry_backoff_seconds,
    )
    selector = Selector(
        tuple(body.selector.hardware_profiles), dict(body.selector.labels), tuple(body.selector.device_ids)
    )
    with svc.ROLLOUT_LOCK:
        rollout, preview = svc.create_rollout(session, body.release_id, selector, plan, who.name, body.dry_run)
        if rollout is None:
            return JSONResponse({"dry_run": True, **preview}, status_code=200)
        if body.start_at is not None and not body.start:
            session.flush()
            svc.schedule(session, rollout, body.start_at, who.name)
        elif body.start:
            session.flush()
            svc.run_command(session, rollout, "start", who.name, "")
        session.commit()
        out = {**rollout_json(session, rollout), "preview": preview}
    return JSONResponse(out, status_code=201)


@router.get("")
def list_rollouts(
    session: SessionDep,
    _who: Viewer,
    state: str | None = Query(default=None, max_length=16),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    stmt = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if state:
        stmt = stmt.where(Rollout.state == state)
    return [rollout_json(session, r, with_devices=False) for r in session.scalars(stmt.offset(offset).limit(limit))]


@router.get("/{rollout_id}")
def show(
    session: SessionDep,
    _who: Viewer,
    rollout_id: str = PathParam(pattern=_ID),
    deployments: bool = Query(default=True, description="include the per-device deployments"),
) -> JSONResponse:
    """State, current stage, counts per deployment state and (unless ``deployments=false``) every deployment."""
    out = rollout_status(session, rollout_id, with_devices=deployments)
    if out is None:
        raise ApiError(404, "Not Found", f"rollout {rollout_id} not found")
    return JSONResponse(out)


_ROLE = {
    "start": Role.RELEASE_MANAGER,
    "approve": Role.RELEASE_MANAGER,
    "pause": Role.OPERATOR,
    "resume": Role.OPERATOR,
    "abort": Role.OPERATOR,
    "rollback": Role.OPERATOR,
}


@router.post("/{rollout_id}/{command}")
def command(
    ctx: CtxDep,
    session: SessionDep,
    who: Operator,
    command: Literal["start", "pause", "resume", "abort", "rollback", "approve"],
    rollout_id: str = PathParam(pattern=_ID),
    body: CommandBody | None = None,
) -> dict[str, Any]:
    """Manual control. ``abort`` with ``{"revert": true}`` also reverts the devices already updated."""
    assert who.role is not None
    if not who.role.allows(_ROLE[command]):
        raise ApiError(403, "Forbidden", f"{command} needs the {_ROLE[command].value} role")
    body = body or CommandBody()
    cmd: Command = "abort_revert" if command == "abort" and body.revert else command
    with svc.ROLLOUT_LOCK:
        rollout = svc.lock_rollout(session, rollout_id)
        if rollout is None:
            raise ApiError(404, "Not Found", f"rollout {rollout_id} not found")
        try:
            to_send = svc.run_command(session, rollout, cmd, who.name, body.reason)
        except TransitionError as exc:
            raise ApiError(409, "Conflict", str(exc)) from exc
        session.commit()
        out = rollout_json(session, rollout)
        stops = take_shadow_stops(session)
        session.commit()  # end the read transaction before dispatch opens its own
    if to_send:
        send_pending(ctx)
    send_shadow_stops(ctx, stops)
    return out
