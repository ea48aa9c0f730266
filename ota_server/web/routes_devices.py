"""Device pages: search and filter (paged in SQL), saved filters, bulk labelling, one device's history."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from ota_server.core.security import Role
from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import Deployment, Device, DeviceModel, StatusEvent, TelemetryRecord
from ota_server.rollout.telemetry_gates import TelemetryTotals
from ota_server.services.devices import is_online
from ota_server.web import actions
from ota_server.web.fleet_view import PAGE_SIZES, DeviceQuery, filter_choices, search_devices
from ota_server.web.render import CheckedForm, Ctx, UiRoute, User, flash_redirect, render, require_role

router = APIRouter(route_class=UiRoute, include_in_schema=False)
DeviceId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
Text = Annotated[str, Query(max_length=512)]


@router.get("/ui/devices")
def device_list(
    request: Request,
    ctx: Ctx,
    user: User,
    q: Text = "",
    profile: Text = "",
    version: Text = "",
    state: Text = "",
    labels: Text = "",
    online: Text = "",
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    size: Annotated[int, Query(ge=1, le=500)] = 50,
) -> HTMLResponse:
    if size not in PAGE_SIZES:
        raise InvalidRequest(f"size: one of {', '.join(str(s) for s in PAGE_SIZES)}")
    query = DeviceQuery.parse(
        {"q": q, "profile": profile, "version": version, "state": state, "labels": labels, "online": online}
    )
    timeout = ctx.settings.device_heartbeat_timeout_seconds
    with ctx.sessions() as session:
        total, devices = search_devices(session, query, timeout, page, size)
        choices = filter_choices(session)
        saved = actions.saved_filters(session, user.token_id)
    base = actions.filter_query_string({**query.as_dict(), "size": size if size != 50 else ""})
    return render(
        request,
        "devices.html",
        page_name="devices",
        query=query,
        devices=devices,
        total=total,
        page=page,
        size=size,
        pages=max(1, -(-total // size)),
        base=base,
        choices=choices,
        saved=saved,
        filter_qs=actions.filter_query_string,
        may_label=user.may(Role.OPERATOR),
    )


def _back(request: Request, form_values: dict[str, str], flash: str) -> RedirectResponse:
    qs = actions.filter_query_string(form_values)
    return flash_redirect(request, f"/ui/devices?{qs}" if qs else "/ui/devices", flash)


def _form_query(form: Any) -> DeviceQuery:
    return DeviceQuery.parse({k: form.get(k) for k in ("q", "profile", "version", "state", "labels", "online")})


@router.post("/ui/devices/labels")
def bulk_label(request: Request, ctx: Ctx, user: User, form: CheckedForm) -> RedirectResponse:
    """Set or remove one label on the selected devices (operator and up); all or nothing."""
    require_role(user, Role.OPERATOR, "labelling devices")
    op = form.get("op", "set")
    if op not in ("set", "remove"):
        raise InvalidRequest("op: set or remove")
    query = _form_query(form)
    with ctx.sessions() as session:
        changed = actions.label_devices(
            session,
            form.all("device_ids"),
            form.get("key").strip(),
            None if op == "remove" else form.get("value").strip(),
            user.name,
        )
        session.commit()
    return _back(request, query.as_dict(), f"labels changed on {changed} device(s)")


@router.post("/ui/devices/filters")
def save_filter(request: Request, ctx: Ctx, user: User, form: CheckedForm) -> RedirectResponse:
    query = _form_query(form)
    with ctx.sessions() as session:
        actions.save_filter(session, user.token_id, form.get("name"), query)
        session.commit()
    return _back(request, query.as_dict(), f"filter {form.get('name').strip()!r} saved")


@router.post("/ui/devices/filters/{filter_id}/delete")
def delete_filter(
    request: Request, ctx: Ctx, user: User, form: CheckedForm, filter_id: Annotated[int, Path(ge=1, le=2**31)]
) -> RedirectResponse:
    with ctx.sessions() as session:
        actions.delete_filter(session, user.token_id, filter_id)
        session.commit()
    return _back(request, {}, "filter deleted")


@router.get("/ui/devices/{device_id}")
def device_page(request: Request, ctx: Ctx, user: User, device_id: DeviceId) -> HTMLResponse:
    with ctx.sessions() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFound(f"device {device_id} not found")
        models = list(session.scalars(select(DeviceModel).where(DeviceModel.device_id == device_id)))
        deployments = list(
            session.scalars(
                select(Deployment)
                .where(Deployment.device_id == device_id)
                .order_by(Deployment.created_at.desc(), Deployment.id.desc())
                .limit(100)
            )
        )
        events = list(
            session.scalars(
                select(StatusEvent).where(StatusEvent.device_id == device_id).order_by(StatusEvent.id.desc()).limit(100)
            )
        )
        windows = list(
            session.scalars(
                select(TelemetryRecord)
                .where(TelemetryRecord.device_id == device_id)
                .order_by(TelemetryRecord.window_end.desc())
                .limit(48)
            )
        )
    telemetry = []
    for w in windows:
        totals = TelemetryTotals()
        totals.add_window(w.payload, w.device_id, True)
        telemetry.append(
            {
                "window_end": w.window_end,
                "version": w.version,
                "requests": w.request_count,
                "errors": w.error_count,
                "p95": totals.latency_quantile_ms(0.95),
            }
        )
    return render(
        request,
        "device.html",
        page_name="device",
        device=device,
        online=is_online(device, ctx.settings.device_heartbeat_timeout_seconds),
        models=models,
        deployments=deployments,
        events=events,
        telemetry=telemetry,
    )
