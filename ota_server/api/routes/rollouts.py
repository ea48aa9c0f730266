"""Rollouts: create (or dry-run), commands, status."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from sqlalchemy import select

from ota_server.api.deps import CtxDep, Operator, ReleaseManager, SessionDep, Viewer
from ota_server.api.responses import RolloutCreated, RolloutDryRun, RolloutStatus
from ota_server.api.schemas import CommandBody, RolloutCreate, strategy_stages
from ota_server.core.security import Role
from ota_server.db import retry_transient
from ota_server.errors import InvalidRequest, NotFound, PermissionDenied
from ota_server.models import Release, Rollout
from ota_server.rollout.bandit import BanditConfig
from ota_server.rollout.engine_logic import Command
from ota_server.rollout.plan import Gates, Plan, Selector, Stage, Window
from ota_server.services import rollouts as svc
from ota_server.services.bandit import create_bandit
from ota_server.services.rollout_status import rollout_json, rollout_status

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"])
_ID = r"^[A-Za-z0-9_-]{1,64}$"


@router.post(
    "",
    status_code=201,
    response_model=RolloutCreated,
    responses={200: {"model": RolloutDryRun, "description": "dry run: the preview only, nothing stored"}},
)
def create(body: RolloutCreate, ctx: CtxDep, session: SessionDep, who: ReleaseManager) -> JSONResponse:
    """Create a rollout (``dry_run`` only previews the stages; ``start`` starts it at once). ``strategy: bandit``
    splits the devices between ``release_id`` and ``arms`` (docs/rollouts.md)."""
    try:
        stages = strategy_stages(body)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    plan = Plan(
        stages=tuple(Stage(s.percent, s.count, s.soak_seconds, s.requires_approval) for s in stages),
        gates=Gates(**body.gates.model_dump()),
        on_failure=body.on_failure,
        windows=tuple(Window(*w.minutes()) for w in body.maintenance_windows),
        mode="shadow" if body.strategy == "shadow" else "install",
        max_retries=body.max_retries,
        retry_backoff_seconds=body.retry_backoff_seconds,
        on_missing_data=body.on_missing_data,
    )
    selector = Selector(
        tuple(body.selector.hardware_profiles), dict(body.selector.labels), tuple(body.selector.device_ids)
    )
    if body.strategy == "bandit":
        out = create_bandit(
            ctx,
            [body.release_id, *body.arms],
            selector,
            plan,
            BanditConfig(**body.bandit.model_dump()),
            who.name,
            dry=body.dry_run,
            start=body.start,
            start_at=body.start_at,
            allow_empty=body.allow_empty,
            override_blessing=body.override_blessing,
        )
        return JSONResponse(out, status_code=200 if body.dry_run else 201)
    if body.arms:
        raise InvalidRequest("arms apply only to strategy bandit")
    out = retry_transient(
        lambda: svc.create(
            ctx,
            body.release_id,
            selector,
            plan,
            who.name,
            dry=body.dry_run,
            start=body.start,
            start_at=body.start_at,
            allow_empty=body.allow_empty,
            override_blessing=body.override_blessing,
        )
    )
    return JSONResponse(out, status_code=200 if body.dry_run else 201)


@router.get("", response_model=list[RolloutStatus], response_model_exclude_unset=True)
def list_rollouts(
    session: SessionDep,
    _who: Viewer,
    state: str | None = Query(default=None, max_length=16),
    model: str | None = Query(default=None, max_length=64, description="the release's model name"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    """Rollouts, newest first, optionally of one state and one model; paged by ``limit`` and ``offset``."""
    stmt = select(Rollout).order_by(Rollout.created_at.desc(), Rollout.id)
    if state:
        stmt = stmt.where(Rollout.state == state)
    if model:
        stmt = stmt.join(Release, Release.id == Rollout.release_id).where(Release.model_name == model)
    return [rollout_json(session, r, with_devices=False) for r in session.scalars(stmt.offset(offset).limit(limit))]


@router.get("/{rollout_id}", response_model=RolloutStatus)
def show(
    session: SessionDep,
    _who: Viewer,
    rollout_id: str = PathParam(pattern=_ID),
    deployments: bool = Query(default=True, description="include the per-device deployments"),
) -> JSONResponse:
    """State, current stage, counts per deployment state and (unless ``deployments=false``) every deployment."""
    out = rollout_status(session, rollout_id, with_devices=deployments)
    if out is None:
        raise NotFound(f"rollout {rollout_id} not found")
    return JSONResponse(out)


COMMAND_ROLE: dict[str, Role] = {
    "start": Role.RELEASE_MANAGER,
    "approve": Role.RELEASE_MANAGER,
    "pause": Role.OPERATOR,
    "resume": Role.OPERATOR,
    "abort": Role.OPERATOR,
    "abort_revert": Role.OPERATOR,
    "rollback": Role.OPERATOR,
    "retry_failed": Role.OPERATOR,
}
"""The least role each operator command needs (the API and the dashboard check the same table)."""


@router.post("/{rollout_id}/{command}", response_model=RolloutStatus, response_model_exclude_unset=True)
def command(
    ctx: CtxDep,
    session: SessionDep,
    who: Operator,
    command: Literal["start", "pause", "resume", "abort", "rollback", "approve", "retry_failed"],
    rollout_id: str = PathParam(pattern=_ID),
    body: CommandBody | None = None,
) -> dict[str, Any]:
    """Manual control. ``abort`` with ``{"revert": true}`` also reverts the devices already updated;
    ``retry_failed`` gives every failed device a new attempt (409 when none failed)."""
    assert who.role is not None
    if not who.role.allows(COMMAND_ROLE[command]):
        raise PermissionDenied(f"{command} needs the {COMMAND_ROLE[command].value} role")
    body = body or CommandBody()
    cmd: Command = "abort_revert" if command == "abort" and body.revert else command
    return retry_transient(lambda: svc.command(ctx, rollout_id, cmd, who.name, body.reason, body.override_blessing))
