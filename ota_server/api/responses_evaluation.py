"""Response bodies of the evaluation API and the blessing part of a rollout's status.

Imports pydantic, the contract and :mod:`edgeota.evaluation.record` only (no FastAPI, no SQLAlchemy), like
:mod:`ota_server.api.responses`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from edgeota.evaluation.record import EvaluationRecord


class EvaluationStored(BaseModel):
    """``POST /api/v1/evaluations`` (201), ``GET /api/v1/evaluations/{id}`` and the rows of its list.

    ``blessed`` and ``record.verdict`` are the server's own verdict, recomputed from the record's metrics and
    thresholds.
    """

    evaluation_id: str
    candidate_release_id: str
    baseline_release_id: str
    model_name: str
    blessed: bool
    dataset_digest: str
    created_at: str
    created_by: str
    record: EvaluationRecord


class BlessingStatus(BaseModel):
    """What the blessing gate found when a rollout started: ``blessed`` / ``not_blessed`` / ``not_evaluated``,
    the evaluation it read, and whether an override reason let the rollout start."""

    release_id: str | None = Field(default=None, description="the release checked (a bandit's most notable arm)")
    state: str
    evaluation_id: str | None
    overridden: bool
    override_reason: str = Field(description="the reason given with the override ('' without one)")
    checked_by: str
    checked_at: str
