"""The telemetry page: charts over time, the drift heat map, release against release, accuracy, retraining."""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse

from ota_server.services.telemetry_aggregates import AggregationConfig
from ota_server.services.telemetry_summary import telemetry_summary
from ota_server.web import retraining_view
from ota_server.web import telemetry_view as tv
from ota_server.web.render import Ctx, UiError, UiRoute, User, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)
Name = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.+-]{0,128}$")]
HOURS = (1, 6, 24, 72, 168)


def _accuracy(session: Any, model: str, since: Any) -> tuple[bool, list[dict[str, Any]]]:
    """Field accuracy rows when the accuracy service exists (it is optional in older servers)."""
    if importlib.util.find_spec("ota_server.services.accuracy") is None:
        return False, []
    from ota_server.services import accuracy

    return True, [row.as_json() for row in accuracy.field_accuracy(session, model_name=model, since=since)]


def _compare(session: Any, store: Any, model: str, a: str, b: str, since: Any, cfg: AggregationConfig) -> list[Any]:
    """Per hardware profile, release ``a`` beside release ``b`` (the fleet review's figures)."""
    out: dict[str, dict[str, Any]] = {}
    for side, version in (("a", a), ("b", b)):
        summary = telemetry_summary(session, store, model_name=model, version=version, since=since, config=cfg)
        for g in summary["groups"]:
            out.setdefault(g["hardware_profile"], {})[side] = g
    return [{"profile": p, **sides} for p, sides in sorted(out.items())]


@router.get("/ui/telemetry")
def telemetry_page(
    request: Request,
    ctx: Ctx,
    user: User,
    model: Name = "",
    version: Name = "",
    profile: Name = "",
    compare: Name = "",
    hours: Annotated[int, Query(ge=1, le=168)] = 24,
) -> HTMLResponse:
    if hours not in HOURS:
        raise UiError(400, f"hours: one of {', '.join(str(h) for h in HOURS)}")
    cfg = AggregationConfig.from_settings(ctx.settings)
    edges = tv.slot_edges(hours, cfg)
    with ctx.sessions() as session:
        models = tv.models(session)
        model = model or (models[0] if models else "")
        versions = tv.versions(session, model) if model else []
        if version and version not in versions:
            raise UiError(400, f"version {version!r}: {model or 'the model'} has no such release")
        drift_version = (
            version or tv.latest_with_telemetry(session, model, edges[0]) or (versions[-1] if versions else "")
        )
        series = tv.series(session, model, version, profile, edges) if model else []
        # Without a profile, the heat map shows the release's busiest profile (known from the series already read).
        busiest = max((s for s in series if s.version == drift_version), key=lambda s: sum(s.requests), default=None)
        heat_profile = profile or (busiest.profile if busiest is not None else "")
        heat = (
            tv.drift_heatmap(session, ctx.store, model, drift_version, heat_profile, edges)
            if model
            else {"features": []}
        )
        rows = (
            _compare(session, ctx.store, model, drift_version, compare, edges[0], cfg)
            if model and compare and drift_version
            else []
        )
        accuracy_present, accuracy = _accuracy(session, model, edges[0]) if model else (False, [])
        alerts = retraining_view.open_alerts(session, model or None)
        exports = retraining_view.exports(session, model or None)
        evaluations = retraining_view.evaluations(session, model=model or None)
    names = [f"{s.version} {s.profile}" for s in series]
    latency = tv.line_chart(list(zip(names, [s.p95 for s in series], strict=True)), edges, "{:.0f} ms")
    errors = tv.line_chart(list(zip(names, [s.error_rate for s in series], strict=True)), edges, "{:.1%}")
    return render(
        request,
        "telemetry.html",
        page_name="telemetry",
        models=models,
        versions=versions,
        model=model,
        version=version,
        drift_version=drift_version,
        profile=profile,
        compare=compare,
        hours=hours,
        hour_choices=HOURS,
        edges=edges,
        series=series,
        latency=latency,
        errors=errors,
        heat=heat,
        compare_rows=rows,
        accuracy_present=accuracy_present,
        accuracy=accuracy,
        alerts=alerts,
        exports=exports,
        evaluations=evaluations,
    )
