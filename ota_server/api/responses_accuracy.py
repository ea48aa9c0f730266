"""Request and response bodies of the feedback and field-accuracy endpoints, as pydantic models.

Same rules as :mod:`ota_server.api.responses`: pydantic and the contract only (no FastAPI, no SQLAlchemy),
field names and shapes are part of the API.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from edgeota_contract.messages import MAX_FEEDBACK_ITEMS, FeedbackItem
from edgeota_contract.topics import DEVICE_ID_PATTERN


class FeedbackSubmission(BaseModel):
    """``POST /api/v1/feedback``: labels or rewards for predictions one device served.

    Each item carries what the agent returned with the answer (``prediction_id``, ``model_name``, ``version``,
    ``bundle_sha256``) and what it predicted (``predicted``: the top-1 class index as text), plus ``label``
    and/or ``reward``.
    """

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=DEVICE_ID_PATTERN)
    items: list[FeedbackItem] = Field(min_length=1, max_length=MAX_FEEDBACK_ITEMS)


class FeedbackAccepted(BaseModel):
    """The feedback was stored (all items): ``stored`` rows were inserted or updated."""

    device_id: str
    stored: int


class AccuracyRecord(BaseModel):
    """Field accuracy of one release on one hardware profile and cohort.

    ``accuracy`` = ``correct / labelled`` from feedback (null without labels); ``estimated_accuracy`` the
    label-free estimate from the confidence histograms and the bundle's calibration over
    ``estimate_requests`` predictions (null without telemetry or calibration).
    """

    model_name: str
    version: str
    hardware_profile: str
    cohort: str
    labelled: int
    correct: int
    accuracy: float | None
    estimated_accuracy: float | None
    estimate_requests: int


class AccuracyReport(BaseModel):
    """``GET /api/v1/accuracy``: the filters as applied and one row per release x profile x cohort."""

    model_name: str
    version: str | None
    cohort: str | None
    since: str | None
    rows: list[AccuracyRecord]
