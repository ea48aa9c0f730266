"""Fleet telemetry review (viewer and up)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN
from ota_server.api.deps import CtxDep, SessionDep, Viewer
from ota_server.api.responses import TelemetrySummary
from ota_server.services.devices import parse_label_selector
from ota_server.services.telemetry_aggregates import AggregationConfig
from ota_server.services.telemetry_summary import telemetry_summary

router = APIRouter(prefix="/api/v1/telemetry", tags=["telemetry"])


@router.get("/summary", response_model=TelemetrySummary)
def summary(
    ctx: CtxDep,
    session: SessionDep,
    _who: Viewer,
    model_name: str | None = Query(default=None, pattern=NAME_PATTERN),
    version: str | None = Query(default=None, pattern=SEMVER_PATTERN),
    profile: str | None = Query(default=None, pattern=NAME_PATTERN),
    since: datetime | None = Query(default=None, description="windows ending at or after this time"),
    until: datetime | None = Query(default=None, description="windows ending at or before this time"),
    cohort: str | None = Query(default=None, max_length=2000, description="device label selector k=v,k2=v2"),
    worst: int = Query(default=10, ge=1, le=1024, description="features listed per group, worst PSI first"),
) -> dict[str, Any]:
    """Telemetry merged per release x hardware profile, with drift verdicts and attribution (see docs/server.md)."""
    labels = parse_label_selector(cohort)
    config = AggregationConfig.from_settings(ctx.settings)
    return telemetry_summary(session, ctx.store, model_name, version, profile, since, until, labels, worst, config)
