"""Application feedback (labels, rewards) and field accuracy per release x hardware profile x cohort."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query

from edgeota_contract.manifest import NAME_PATTERN, SEMVER_PATTERN
from ota_server.api.deps import AnyCaller, CtxDep, SessionDep, Viewer
from ota_server.api.responses_accuracy import AccuracyReport, FeedbackAccepted, FeedbackSubmission
from ota_server.core.security import Role
from ota_server.errors import PermissionDenied
from ota_server.services.accuracy import field_accuracy
from ota_server.services.feedback import submit_feedback

router = APIRouter(prefix="/api/v1", tags=["accuracy"])


@router.post("/feedback", status_code=201, response_model=FeedbackAccepted)
def post_feedback(body: FeedbackSubmission, ctx: CtxDep, session: SessionDep, who: AnyCaller) -> dict[str, Any]:
    """Store labels or rewards for predictions of one device (all items, or none on any error).

    Callers: the device's own token (for itself only) or an API token of the operator role or above (an
    application backend that learns the truth later); viewer tokens are read-only (403).
    """
    if who.device_id is None and (who.role is None or not who.role.allows(Role.OPERATOR)):
        raise PermissionDenied("reporting feedback needs a device token or the operator role")
    stored = submit_feedback(
        session,
        body.device_id,
        body.items,
        caller_device=who.device_id,
        cohort_label=ctx.settings.telemetry_cohort_label,
    )
    session.commit()
    return {"device_id": body.device_id, "stored": stored}


@router.get("/accuracy", response_model=AccuracyReport)
def accuracy(
    ctx: CtxDep,
    session: SessionDep,
    _who: Viewer,
    model_name: str = Query(pattern=NAME_PATTERN),
    version: str | None = Query(default=None, pattern=SEMVER_PATTERN),
    cohort: str | None = Query(default=None, max_length=128, description="the cohort label's value ('' for none)"),
    since: datetime | None = Query(default=None, description="feedback received / telemetry buckets from this time"),
) -> dict[str, Any]:
    """Real accuracy from feedback beside the label-free estimate, per release x hardware profile x cohort."""
    rows = field_accuracy(
        session,
        model_name=model_name,
        version=version,
        since=since,
        cohort=cohort,
        store=ctx.store,
        bucket_seconds=ctx.settings.telemetry_bucket_seconds,
    )
    return {
        "model_name": model_name,
        "version": version,
        "cohort": cohort,
        "since": since.isoformat() if since else None,
        "rows": [r.as_json() for r in rows],
    }
