"""Accuracy in the field: real accuracy from application feedback, beside a label-free estimate.

- **Real accuracy** per release (model name + version) x hardware profile x cohort is counted in SQL over
  ``feedback``: ``labelled`` rows carry a label (``correct`` is not null), ``correct`` of them matched the
  device's top-1 prediction. Rows with only a reward count for the bandit, not here.
- **Estimated accuracy** (CBPE-style, see :mod:`ota_server.services.accuracy_estimate`) comes from the
  confidence histograms in ``telemetry_aggregates`` mapped through the calibration the packager shipped in
  the bundle's ``reference_stats.json``. Groups with telemetry and no feedback appear with ``labelled=0`` and
  ``accuracy=None``; groups whose bundles carry no calibration have ``estimated_accuracy=None``.

``since`` filters feedback on ``received_at`` (when the label arrived; indexed) and telemetry on the bucket
start of the windows (when the predictions were served), so with ``since`` the two can cover slightly
different predictions; without it both cover everything stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Integer, case, func, select
from sqlalchemy.orm import Session

from ota_server.artifacts import ArtifactStore
from ota_server.errors import InvalidRequest
from ota_server.models import Feedback
from ota_server.services.accuracy_estimate import GroupKey, estimates


@dataclass(frozen=True)
class AccuracyRow:
    """Field accuracy of one release on one hardware profile and cohort.

    ``accuracy`` is ``correct / labelled`` (None when nothing is labelled); ``estimated_accuracy`` is the
    CBPE-style estimate over ``estimate_requests`` predictions with a confidence (None without telemetry or
    without a calibration in the bundle).
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

    @property
    def key(self) -> GroupKey:
        return (self.model_name, self.version, self.hardware_profile, self.cohort)

    def as_json(self) -> dict[str, object]:
        return {
            "model_name": self.model_name,
            "version": self.version,
            "hardware_profile": self.hardware_profile,
            "cohort": self.cohort,
            "labelled": self.labelled,
            "correct": self.correct,
            "accuracy": self.accuracy,
            "estimated_accuracy": self.estimated_accuracy,
            "estimate_requests": self.estimate_requests,
        }


def ratio(correct: int, labelled: int) -> float | None:
    """``correct / labelled``, None when nothing is labelled."""
    return correct / labelled if labelled > 0 else None


def labelled_counts(
    session: Session,
    *,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
    cohort: str | None = None,
) -> dict[GroupKey, tuple[int, int]]:
    """(labelled, correct) per release x profile x cohort, counted by the database over ``feedback``."""
    correct_int = case((Feedback.correct.is_(True), 1), else_=0)
    stmt = (
        select(
            Feedback.model_name,
            Feedback.version,
            Feedback.hardware_profile,
            Feedback.cohort,
            func.count(Feedback.correct),
            func.coalesce(func.sum(correct_int), 0).cast(Integer),
        )
        .where(Feedback.model_name == model_name, Feedback.correct.is_not(None))
        .group_by(Feedback.model_name, Feedback.version, Feedback.hardware_profile, Feedback.cohort)
    )
    if version is not None:
        stmt = stmt.where(Feedback.version == version)
    if since is not None:
        stmt = stmt.where(Feedback.received_at >= since)
    if cohort is not None:
        stmt = stmt.where(Feedback.cohort == cohort)
    return {(r[0], r[1], r[2], r[3]): (int(r[4]), int(r[5])) for r in session.execute(stmt)}


def merge_rows(
    labelled: dict[GroupKey, tuple[int, int]],
    estimates: dict[GroupKey, tuple[float | None, int]],
) -> list[AccuracyRow]:
    """One row per group present in either source, sorted by key (pure: the grouping the API shows)."""
    rows = []
    for key in sorted(set(labelled) | set(estimates)):
        n, ok = labelled.get(key, (0, 0))
        est, est_n = estimates.get(key, (None, 0))
        rows.append(
            AccuracyRow(
                *key, labelled=n, correct=ok, accuracy=ratio(ok, n), estimated_accuracy=est, estimate_requests=est_n
            )
        )
    return rows


def field_accuracy(
    session: Session,
    *,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
    cohort: str | None = None,
    store: ArtifactStore | None = None,
    bucket_seconds: int = 300,
) -> list[AccuracyRow]:
    """Real and estimated accuracy per release x hardware profile x cohort of ``model_name``, sorted by key.

    Filters: ``version`` (one release), ``since`` (see the module docstring), ``cohort`` (exact value; ""
    selects devices without the cohort label). ``store`` (the server's artifact store, where the bundles'
    calibrations are read) enables the estimate: without it every ``estimated_accuracy`` is None and only
    groups with feedback are listed. ``bucket_seconds``: the server's ``telemetry_bucket_seconds``.
    Raises :class:`InvalidRequest` for an empty model name. Reads only; never writes.
    """
    if not model_name:
        raise InvalidRequest("model name must not be empty")
    counts = labelled_counts(session, model_name=model_name, version=version, since=since, cohort=cohort)
    estimated: dict[GroupKey, tuple[float | None, int]] = {}
    if store is not None:
        estimated = estimates(
            session,
            store,
            model_name=model_name,
            version=version,
            since=since,
            cohort=cohort,
            bucket_seconds=bucket_seconds,
        )
    return merge_rows(counts, estimated)
