"""Field accuracy in the Prometheus exposition (:mod:`ota_server.services.prometheus_metrics`).

Gauges by model, version, hardware profile and cohort (never by device), from one grouped query over
``feedback``: ``edgeota_feedback_labelled`` (predictions with a true label), ``edgeota_feedback_correct``
(of which the device's top-1 answer was right) and ``edgeota_field_accuracy`` (their ratio, only where
something is labelled). Gauges, not counters: a later report may change a stored label. The label-free
estimate is not exported (it needs the bundles' calibrations; ``GET /api/v1/accuracy`` has it).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Integer, case, func, select
from sqlalchemy.orm import Session

from ota_server.models import Feedback

LABELS = ["model", "version", "profile", "cohort"]


def feedback_families(session: Session) -> Iterator[Metric]:
    """The three field-accuracy gauge families of one scrape."""
    labelled = GaugeMetricFamily("edgeota_feedback_labelled", "Predictions with a reported true label.", labels=LABELS)
    correct = GaugeMetricFamily(
        "edgeota_feedback_correct", "Labelled predictions whose top-1 answer was right.", labels=LABELS
    )
    accuracy = GaugeMetricFamily(
        "edgeota_field_accuracy", "Accuracy from application feedback (correct / labelled).", labels=LABELS
    )
    fb = Feedback
    rows = session.execute(
        select(
            fb.model_name,
            fb.version,
            fb.hardware_profile,
            fb.cohort,
            func.count(fb.correct),
            func.coalesce(func.sum(case((fb.correct.is_(True), 1), else_=0)), 0).cast(Integer),
        )
        .where(fb.correct.is_not(None))
        .group_by(fb.model_name, fb.version, fb.hardware_profile, fb.cohort)
        .order_by(fb.model_name, fb.version, fb.hardware_profile, fb.cohort)
    )
    for model, version, profile, cohort, n, ok in rows:
        key = [model, version, profile, cohort]
        labelled.add_metric(key, int(n))
        correct.add_metric(key, int(ok))
        if n:
            accuracy.add_metric(key, int(ok) / int(n))
    yield labelled
    yield correct
    yield accuracy
