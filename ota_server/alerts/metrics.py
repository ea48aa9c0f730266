"""Alert metric families for the Prometheus exposition (:mod:`ota_server.services.prometheus_metrics`).

From the database, so every API worker answers the same: alerts raised (one per alert episode, so the counter
only grows while rows are kept), open alerts by state, and deliveries by target kind and outcome. Suppressed
re-fires (cooldown) come from the core's counters. Labels are rules, kinds, severities and states, never
devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ota_server.alerts.records import OPEN_STATES, Alert, AlertDelivery


def alert_families(session: Session, counters: Mapping[str, int]) -> Iterator[Metric]:
    """``edgeota_alerts_total`` (all raised), ``edgeota_alerts_raised_total{rule,kind,severity}``,
    ``edgeota_alerts_open{rule,kind,severity,state}``, ``edgeota_alert_deliveries_total{target_kind,state}``,
    ``edgeota_alerts_suppressed_total``."""
    rows = list(
        session.execute(
            select(Alert.rule, Alert.kind, Alert.severity, Alert.state, func.count()).group_by(
                Alert.rule, Alert.kind, Alert.severity, Alert.state
            )
        )
    )
    total = CounterMetricFamily("edgeota_alerts", "Alerts raised (alert episodes), all rules.")
    total.add_metric([], sum(int(n) for *_, n in rows))
    yield total
    raised: dict[tuple[str, str, str], int] = {}
    for rule, kind, severity, _state, n in rows:
        raised[(rule, kind, severity)] = raised.get((rule, kind, severity), 0) + int(n)
    family = CounterMetricFamily(
        "edgeota_alerts_raised", "Alerts raised by rule, kind and severity.", labels=["rule", "kind", "severity"]
    )
    for key, n in sorted(raised.items()):
        family.add_metric(list(key), n)
    yield family
    open_family = GaugeMetricFamily(
        "edgeota_alerts_open",
        "Alerts firing or acknowledged now.",
        labels=["rule", "kind", "severity", "state"],
    )
    for rule, kind, severity, state, n in sorted(rows):
        if state in OPEN_STATES:
            open_family.add_metric([rule, kind, severity, state], int(n))
    yield open_family
    deliveries = CounterMetricFamily(
        "edgeota_alert_deliveries", "Alert deliveries by target kind and state.", labels=["target_kind", "state"]
    )
    for kind, state, n in session.execute(
        select(AlertDelivery.target_kind, AlertDelivery.state, func.count()).group_by(
            AlertDelivery.target_kind, AlertDelivery.state
        )
    ):
        deliveries.add_metric([kind, state], int(n))
    yield deliveries
    suppressed = CounterMetricFamily(
        "edgeota_alerts_suppressed", "Re-fires suppressed by a rule's cooldown (core process counter)."
    )
    suppressed.add_metric([], counters.get("alerts_suppressed", 0))
    yield suppressed
