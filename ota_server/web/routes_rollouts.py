"""Rollout pages: the list, one rollout (live), the confirmation step of each action and the action itself."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from sqlalchemy import func, select

from edgeota_contract.states import RolloutState
from ota_server.api.routes.rollouts import COMMAND_ROLE
from ota_server.errors import NotFound
from ota_server.models import Deployment, Release, Rollout
from ota_server.rollout.engine_logic import Command
from ota_server.rollout.plan import Plan
from ota_server.services import rollouts as svc
from ota_server.services.rollout_status import rollout_status
from ota_server.web import rollout_view as rv
from ota_server.web.render import CheckedForm, Ctx, UiError, UiRoute, User, flash_redirect, render, require_role

router = APIRouter(route_class=UiRoute, include_in_schema=False)
RolloutId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
PAGE = 50


@router.get("/ui/rollouts")
def rollout_list(
    request: Request,
    ctx: Ctx,
    user: User,
    state: Annotated[str, Query(max_length=16)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> HTMLResponse:
    if state and state not in {s.value for s in RolloutState}:
        raise UiError(400, f"state: {state!r} is not a rollout state")
    with ctx.sessions() as session:
        stmt = select(
            Rollout.id,
            Rollout.state,
            Rollout.current_stage,
            Rollout.plan,
            Rollout.halted_by,
            Rollout.created_at,
            Rollout.updated_at,
            Rollout.created_by,
            Release.model_name,
            Release.version,
            func.json_array_length(Rollout.targets).label("targets"),
        ).join(Release, Release.id == Rollout.release_id)
        count_stmt = select(func.count()).select_from(Rollout)
        if state:
            stmt = stmt.where(Rollout.state == state)
            count_stmt = count_stmt.where(Rollout.state == state)
        total = int(session.scalar(count_stmt) or 0)
        rows = session.execute(
            stmt.order_by(Rollout.created_at.desc(), Rollout.id).offset((page - 1) * PAGE).limit(PAGE)
        ).all()
        ids = [r.id for r in rows]
        counts: dict[str, dict[str, int]] = {}
        if ids:
            for rid, st, n in session.execute(
                select(Deployment.rollout_id, Deployment.state, func.count())
                .where(Deployment.rollout_id.in_(ids), Deployment.retried.is_(False), Deployment.mode != "rollback")
                .group_by(Deployment.rollout_id, Deployment.state)
            ):
                counts.setdefault(str(rid), {})[st] = int(n)
    items = [
        {
            "row": r,
            "stages": len(Plan.from_json(r.plan).stages),
            "committed": counts.get(r.id, {}).get("committed", 0),
            "failed": sum(n for s, n in counts.get(r.id, {}).items() if s in rv.FAILED),
        }
        for r in rows
    ]
    return render(
        request,
        "rollouts.html",
        page_name="rollouts",
        items=items,
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE)),
        state=state,
        states=[s.value for s in RolloutState],
    )


def _detail(ctx: Any, user: Any, rollout_id: str) -> dict[str, Any]:
    with ctx.sessions() as session:
        status = rollout_status(session, rollout_id)
        if status is None:
            raise NotFound(f"rollout {rollout_id} not found")
        release = session.get(Release, status["release_id"])
        mode = Plan.from_json(status["plan"]).mode
        counted = rv.groups(session, rollout_id, mode)  # one grouped read for the stages and the profiles
        return {
            "s": status,
            "release": release,
            "stages": rv.stages(session, status, counted),
            "profiles": rv.profiles(session, status, mode, counted),
            "incompatible": rv.incompatible(session, status["no_bundle_for_profile"]),
            "failed_devices": rv.failed_devices(session, rollout_id, mode),
            "timeline": rv.timeline(session, rollout_id),
            "actions": rv.allowed_actions(user, status["state"], status),
            "gates": [*(status["gates"] or []), rv.failure_rate_gate(status)],
        }


@router.get("/ui/rollouts/{rollout_id}")
def rollout_page(request: Request, ctx: Ctx, user: User, rollout_id: RolloutId) -> HTMLResponse:
    data = _detail(ctx, user, rollout_id)
    return render(
        request,
        "rollout.html",
        page_name="rollout",
        live_url=f"/ui/rollouts/{rollout_id}/live.json",
        labels=rv.ACTION_LABEL,
        **data,
    )


@router.get("/ui/rollouts/{rollout_id}/live.json")
def rollout_live(ctx: Ctx, user: User, rollout_id: RolloutId) -> JSONResponse:
    with ctx.sessions() as session:
        out = rv.live(session, rollout_id)
    if out is None:
        raise NotFound(f"rollout {rollout_id} not found")
    return JSONResponse(out, headers={"Cache-Control": "no-store"})


def _command(command: str) -> Command:
    if command not in rv.ACTIONS:
        raise UiError(404, f"no action {command!r}")
    return command  # type: ignore[return-value]


@router.get("/ui/rollouts/{rollout_id}/confirm/{command}")
def confirm_page(request: Request, ctx: Ctx, user: User, rollout_id: RolloutId, command: str) -> HTMLResponse:
    cmd = _command(command)
    require_role(user, COMMAND_ROLE[cmd], rv.ACTION_LABEL[cmd])
    data = _detail(ctx, user, rollout_id)
    return render(
        request,
        "confirm.html",
        page_name="confirm",
        command=cmd,
        label=rv.ACTION_LABEL[cmd],
        explain=rv.ACTION_EXPLAIN[cmd],
        allowed=cmd in data["actions"],
        **data,
    )


@router.post("/ui/rollouts/{rollout_id}/{command}")
def run_action(
    request: Request, ctx: Ctx, user: User, form: CheckedForm, rollout_id: RolloutId, command: str
) -> RedirectResponse:
    """Runs the command through the rollout core (the same unit of work as the API); 403 for a role that may not."""
    cmd = _command(command)
    require_role(user, COMMAND_ROLE[cmd], rv.ACTION_LABEL[cmd])
    reason = form.get("reason").strip()[:500] or f"{rv.ACTION_LABEL[cmd]} (dashboard)"
    svc.command(ctx, rollout_id, cmd, user.name, reason)
    return flash_redirect(request, f"/ui/rollouts/{rollout_id}", f"{rv.ACTION_LABEL[cmd]}: done")
