"""Label-free accuracy estimate (CBPE-style) from telemetry confidence histograms and the bundle's calibration.

For each telemetry aggregate row of a model (release x profile x cohort x bucket, per bundle), the confidence
histogram of the bundle's calibrated output (``calibration.json``, :mod:`edgeota_contract.calibration`) is
mapped through the calibration's per-bin accuracy; groups add the mapped counts up. Bin alignment: devices
bin confidences on ``CONFIDENCE_EDGES`` and the packager bins its evaluation rows on the same edges; a
calibration on other edges, or a histogram with another bin count, gives no estimate (never a guess).
Bundles without ``calibration.json`` (packaged before it existed, or without labelled evaluation data) give
no estimate either: their groups read ``estimated_accuracy = None`` with ``estimate_requests = 0``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from edgeota_contract.calibration import CALIBRATION_FILE, ConfidenceCalibration, aligned, bin_accuracy
from ota_server.artifacts import ArtifactStore
from ota_server.models import TelemetryAggregate
from ota_server.services.bundle_documents import bundle_document
from ota_server.services.telemetry_aggregates import bucket_start, read_aggregates

GroupKey = tuple[str, str, str, str]
"""(model name, version, hardware profile, cohort)."""


def bundle_calibration(store: ArtifactStore, sha256: str) -> ConfidenceCalibration | None:
    """A stored bundle's ``calibration.json`` (None when absent, unreadable or not stored); cached per sha."""
    return bundle_document(store, sha256, CALIBRATION_FILE, ConfidenceCalibration)


def mapped(cal: ConfidenceCalibration | None, confidence: dict[str, list[int]]) -> tuple[float, int] | None:
    """(sum of calibrated probabilities of a correct answer, predictions) of one histogram set, or None when
    the calibration is missing, on other bins, or names an output the histograms do not have (pure)."""
    out = cal.for_output() if cal is not None else None
    if out is None or not aligned(out):
        return None
    counts = confidence.get(out.output)
    if counts is None or len(counts) != len(out.counts):
        return None
    probs = bin_accuracy(out)
    return sum(n * p for n, p in zip(counts, probs, strict=True)), sum(counts)


def estimates(
    session: Session,
    store: ArtifactStore,
    *,
    model_name: str,
    version: str | None = None,
    since: datetime | None = None,
    cohort: str | None = None,
    bucket_seconds: int = 300,
) -> dict[GroupKey, tuple[float | None, int]]:
    """(estimated accuracy, predictions it covers) per release x profile x cohort with telemetry.

    ``since`` keeps the aggregate buckets that start at or after ``since`` rounded down to a bucket (the
    bucket holding ``since`` is included whole). A group whose bundles carry no usable calibration maps to
    (None, 0).
    """
    where: list[Any] = [TelemetryAggregate.model_name == model_name]
    if version is not None:
        where.append(TelemetryAggregate.version == version)
    if cohort is not None:
        where.append(TelemetryAggregate.cohort == cohort)
    if since is not None:
        where.append(TelemetryAggregate.bucket_start >= bucket_start(since, bucket_seconds))
    sums: dict[GroupKey, list[float]] = {}
    for row, totals in read_aggregates(session, *where):
        key: GroupKey = (row.model_name, row.version, row.hardware_profile, row.cohort)
        acc = sums.setdefault(key, [0.0, 0.0])
        part = mapped(bundle_calibration(store, row.bundle_sha256), totals.confidence)
        if part is not None:
            acc[0] += part[0]
            acc[1] += part[1]
    return {k: ((s / n, int(n)) if n > 0 else (None, 0)) for k, (s, n) in sums.items()}
