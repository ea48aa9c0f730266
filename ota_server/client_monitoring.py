"""The monitoring calls of :class:`ota_server.client.ApiClient`: evaluations, the telemetry summary, field
accuracy and feedback, and alerts.

:class:`MonitoringCalls` is a mixin: ``ApiClient`` supplies the typed request (:meth:`MonitoringCalls._typed`).
Every method raises :class:`~ota_server.client_errors.ApiClientError` as ``ApiClient``'s do. Also here:
:func:`query_params`, the query-string encoding every client call shares. Imports no FastAPI and no
SQLAlchemy (and not :mod:`ota_server.client`, which imports this module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from edgeota.evaluation.record import EvaluationRecord
from ota_server.api.responses import TelemetrySummary
from ota_server.api.responses_accuracy import AccuracyReport, FeedbackAccepted
from ota_server.api.responses_alerts import AlertRecord
from ota_server.api.responses_evaluation import EvaluationStored

T = TypeVar("T")


def query_params(**values: Any) -> dict[str, Any]:
    """Query parameters without the unset ones; booleans as the API spells them."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        out[key] = ("true" if value else "false") if isinstance(value, bool) else value
    return out


class MonitoringCalls:
    """Evaluations, telemetry, accuracy, feedback and alerts endpoints (mixed into ``ApiClient``)."""

    def _typed(self, kind: type[T], method: str, path: str, **kwargs: Any) -> T:
        """One call validated as ``kind``; ``ApiClient`` implements it."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluations

    def create_evaluation(self, record: EvaluationRecord) -> EvaluationStored:
        """``POST /api/v1/evaluations``: the server re-checks the record and stores its own verdict."""
        body = record.model_dump(mode="json")
        return self._typed(EvaluationStored, "POST", "/api/v1/evaluations", json=body)

    def evaluations(self, release_id: str | None = None, limit: int = 100, offset: int = 0) -> list[EvaluationStored]:
        """Newest first; ``release_id``: evaluations with that release as candidate."""
        params = query_params(release=release_id, limit=limit, offset=offset)
        return self._typed(list[EvaluationStored], "GET", "/api/v1/evaluations", params=params)

    def evaluation(self, evaluation_id: str) -> EvaluationStored:
        return self._typed(EvaluationStored, "GET", f"/api/v1/evaluations/{evaluation_id}")

    # ------------------------------------------------------------------ telemetry, accuracy and feedback

    def telemetry_summary(
        self,
        model_name: str | None = None,
        version: str | None = None,
        profile: str | None = None,
        since: str | None = None,
        until: str | None = None,
        cohort: str | None = None,
        worst: int = 10,
    ) -> TelemetrySummary:
        """Stored telemetry merged per release x hardware profile (``cohort``: a label selector ``k=v,...``)."""
        params = query_params(
            model_name=model_name,
            version=version,
            profile=profile,
            since=since,
            until=until,
            cohort=cohort,
            worst=worst,
        )
        return self._typed(TelemetrySummary, "GET", "/api/v1/telemetry/summary", params=params)

    def field_accuracy(
        self,
        model_name: str,
        version: str | None = None,
        cohort: str | None = None,
        since: str | None = None,
    ) -> AccuracyReport:
        """Accuracy from feedback beside the label-free estimate, per release x hardware profile x cohort."""
        params = query_params(model_name=model_name, version=version, cohort=cohort, since=since)
        return self._typed(AccuracyReport, "GET", "/api/v1/accuracy", params=params)

    def report_feedback(self, device_id: str, items: Sequence[Mapping[str, Any]]) -> FeedbackAccepted:
        """Store labels or rewards for predictions of ``device_id`` (each item as ``FeedbackItem`` fields)."""
        body = {"device_id": device_id, "items": [dict(i) for i in items]}
        return self._typed(FeedbackAccepted, "POST", "/api/v1/feedback", json=body)

    # ------------------------------------------------------------------ alerts

    def alerts(
        self, state: str | None = None, rule: str | None = None, limit: int = 100, offset: int = 0
    ) -> list[AlertRecord]:
        """Alerts newest first (``state``: open, firing, acknowledged or resolved)."""
        params = query_params(state=state, rule=rule, limit=limit, offset=offset)
        return self._typed(list[AlertRecord], "GET", "/api/v1/alerts", params=params)

    def ack_alert(self, alert_id: str, reason: str = "") -> AlertRecord:
        """Acknowledge a firing alert (operator role; audited)."""
        return self._typed(AlertRecord, "POST", f"/api/v1/alerts/{alert_id}/ack", json={"reason": reason})
