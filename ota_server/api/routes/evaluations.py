"""Evaluations of candidate releases against the serving release (upload and read); see docs/evaluation.md."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from edgeota.evaluation.record import RELEASE_ID_PATTERN, EvaluationRecord
from ota_server.api.deps import Operator, SessionDep, Viewer
from ota_server.api.responses_evaluation import EvaluationStored
from ota_server.services import evaluations as svc

router = APIRouter(prefix="/api/v1/evaluations", tags=["evaluations"])


@router.post("", status_code=201, response_model=EvaluationStored)
def create(body: EvaluationRecord, session: SessionDep, who: Operator) -> dict[str, Any]:
    """Store an evaluation record (``edgeota evaluate`` uploads it). The server re-checks it and recomputes the
    verdict from its metrics and thresholds: 404 for an unknown release, 422 for bundles that are not the
    releases', slices that do not add up, or a verdict that does not follow from them."""
    evaluation = svc.store_evaluation(session, body, who.name)
    session.commit()
    return svc.evaluation_json(evaluation)


@router.get("", response_model=list[EvaluationStored])
def list_evaluations(
    session: SessionDep,
    _who: Viewer,
    release: str | None = Query(default=None, pattern=RELEASE_ID_PATTERN, description="candidate release id"),
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0, le=10_000_000),
) -> list[dict[str, Any]]:
    """Newest first (the first one of a release is what its rollouts' blessing gate reads)."""
    return [svc.evaluation_json(e) for e in svc.list_evaluations(session, release, limit, offset)]


@router.get("/{evaluation_id}", response_model=EvaluationStored)
def show(
    session: SessionDep, _who: Viewer, evaluation_id: str = PathParam(pattern=r"^[0-9a-f]{32}$")
) -> dict[str, Any]:
    return svc.evaluation_json(svc.get_evaluation(session, evaluation_id))
