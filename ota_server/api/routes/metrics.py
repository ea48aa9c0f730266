"""``GET /metrics``: the Prometheus exposition (see :mod:`ota_server.services.prometheus_metrics`).

Auth: a viewer token (``Authorization: Bearer ...``; Prometheus's ``authorization`` scrape setting),
like the JSON counters at ``/api/v1/metrics``. ``metrics_public = true`` serves it without a token, for a
scraper on a private network.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ota_server.api.deps import CtxDep, SessionDep, principal
from ota_server.core.security import Role
from ota_server.errors import PermissionDenied
from ota_server.services.prometheus_metrics import exposition

router = APIRouter(tags=["health"])


async def _scraper(request: Request, ctx: CtxDep) -> None:
    """A viewer token, unless ``metrics_public``."""
    if ctx.settings.metrics_public:
        return
    who = await principal(request, ctx)
    if who.role is None or not who.role.allows(Role.VIEWER):
        raise PermissionDenied("this call needs the viewer role")


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(_scraper)],
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
def metrics(ctx: CtxDep, session: SessionDep) -> Response:
    """Prometheus text format: ingest, queue depth, rollouts, devices, telemetry, gate evaluations, alerts."""
    body = exposition(session, ctx.metrics_snapshot(), ctx.settings.telemetry_cohort_label)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
