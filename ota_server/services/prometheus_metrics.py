"""The Prometheus exposition (``GET /metrics``): fleet state from the database, counters from the core process.

Every scrape builds a fresh registry with one collector, so nothing lives in a module-level registry
and every API worker answers the same (``--workers N``):

- **from the database** (the same for every process): rollouts by state, devices by model, version,
  hardware profile and cohort, and telemetry windows / requests / errors / attributed requests by
  model, version, profile and cohort (sums of the telemetry aggregates, so they only grow);
- **from the counters** (:meth:`ota_server.context.ServerContext.metrics_snapshot`: this process's plus,
  in an API worker, the core's, which runs the ingest writers and the rollout engine): ingest messages
  by outcome, batches, back-pressure waits, the writers' queue depth, and gate evaluations by gate and
  result.
- **field accuracy** (:mod:`ota_server.services.accuracy_metrics`): labelled and correct predictions from
  application feedback, and their ratio, by model, version, profile and cohort;
- **alerts** (:mod:`ota_server.alerts.metrics`): raised in all and by rule, kind and severity, open by state,
  deliveries by target kind and state, re-fires suppressed by cooldown.

Labels are profiles, versions, cohorts, states and outcomes: never a device id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.states import RolloutState
from ota_server.alerts.metrics import alert_families
from ota_server.models import Device, DeviceModel, Rollout, TelemetryAggregate
from ota_server.services.accuracy_metrics import feedback_families
from ota_server.services.rollouts import GATE_METRIC_PREFIX
from ota_server.services.telemetry_aggregates import cohort_of

QUEUE_DEPTH = "ingest_queue_depth"
_INGEST_OTHER = {
    "ingest_batches",
    "ingest_batch_failed",
    "ingest_batch_redone",
    "ingest_backpressure_waits",
    QUEUE_DEPTH,
}


class FleetCollector(Collector):
    """One scrape's metrics: ``session`` for the database part, ``counters`` for the process part."""

    def __init__(self, session: Session, counters: Mapping[str, int], cohort_label: str) -> None:
        self.session = session
        self.counters = counters
        self.cohort_label = cohort_label

    def collect(self) -> Iterator[Metric]:
        yield from self._ingest()
        yield from self._gates()
        yield from self._rollouts()
        yield from self._devices()
        yield from self._telemetry()
        yield from feedback_families(self.session)
        yield from alert_families(self.session, self.counters)

    def _ingest(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "edgeota_ingest_messages", "Device messages by ingest outcome (ok, duplicate, ...).", labels=["outcome"]
        )
        for name, value in sorted(self.counters.items()):
            if name.startswith("ingest_") and name not in _INGEST_OTHER:
                messages.add_metric([name.removeprefix("ingest_")], value)
        yield messages
        batches = CounterMetricFamily("edgeota_ingest_batches", "Ingest transactions (batches of messages).")
        batches.add_metric([], self.counters.get("ingest_batches", 0))
        yield batches
        waits = CounterMetricFamily("edgeota_ingest_backpressure_waits", "Times MQTT intake waited for a full queue.")
        waits.add_metric([], self.counters.get("ingest_backpressure_waits", 0))
        yield waits
        depth = GaugeMetricFamily("edgeota_ingest_queue_depth", "Messages waiting in the ingest writers' queues.")
        depth.add_metric([], max(0, self.counters.get(QUEUE_DEPTH, 0)))
        yield depth

    def _gates(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "edgeota_gate_evaluations",
            "Telemetry gate evaluations by the rollout engine, by gate and result.",
            labels=["gate", "result"],
        )
        for name, value in sorted(self.counters.items()):
            if name.startswith(GATE_METRIC_PREFIX):
                gate, _, result = name.removeprefix(GATE_METRIC_PREFIX).partition(":")
                family.add_metric([gate, result], value)
        yield family

    def _rollouts(self) -> Iterator[Metric]:
        counts = dict(
            (state, int(n))
            for state, n in self.session.execute(select(Rollout.state, func.count()).group_by(Rollout.state))
        )
        family = GaugeMetricFamily("edgeota_rollouts", "Rollouts by state.", labels=["state"])
        for state in RolloutState:
            family.add_metric([state.value], counts.get(state.value, 0))
        yield family

    def _devices(self) -> Iterator[Metric]:
        registered: Counter[tuple[str, str]] = Counter()
        labels_of: dict[str, Any] = {}
        for device_id, profile, labels in self.session.execute(
            select(Device.id, Device.hardware_profile, Device.labels)
        ):
            cohort = cohort_of(labels, self.cohort_label)
            registered[(profile, cohort)] += 1
            labels_of[device_id] = (profile, cohort)
        family = GaugeMetricFamily(
            "edgeota_devices_registered",
            "Provisioned devices by hardware profile and cohort.",
            labels=["profile", "cohort"],
        )
        for (profile, cohort), n in sorted(registered.items()):
            family.add_metric([profile, cohort], n)
        yield family
        running: Counter[tuple[str, str, str, str]] = Counter()
        for device_id, model, version in self.session.execute(
            select(DeviceModel.device_id, DeviceModel.model_name, DeviceModel.version)
        ):
            profile, cohort = labels_of.get(device_id, ("", ""))
            running[(model, version, profile, cohort)] += 1
        family = GaugeMetricFamily(
            "edgeota_devices",
            "Devices by the model version they run, hardware profile and cohort.",
            labels=["model", "version", "profile", "cohort"],
        )
        for key, n in sorted(running.items()):
            family.add_metric(list(key), n)
        yield family

    def _telemetry(self) -> Iterator[Metric]:
        agg = TelemetryAggregate
        labels = ["model", "version", "profile", "cohort"]
        families = {
            "windows": CounterMetricFamily("edgeota_telemetry_windows", "Telemetry windows ingested.", labels=labels),
            "requests": CounterMetricFamily(
                "edgeota_telemetry_requests", "Inference requests reported.", labels=labels
            ),
            "errors": CounterMetricFamily(
                "edgeota_telemetry_errors", "Failed inference requests reported.", labels=labels
            ),
            "attributed": CounterMetricFamily(
                "edgeota_telemetry_attributed_requests",
                "Requests whose bundle names a stored release (version attribution).",
                labels=labels,
            ),
        }
        rows = self.session.execute(
            select(
                agg.model_name,
                agg.version,
                agg.hardware_profile,
                agg.cohort,
                func.sum(agg.windows),
                func.sum(agg.requests),
                func.sum(agg.errors),
                func.sum(agg.attributed_requests),
            ).group_by(agg.model_name, agg.version, agg.hardware_profile, agg.cohort)
        )
        total = known = 0
        for model, version, profile, cohort, windows, requests, errors, attributed in rows:
            key = [model, version, profile, cohort]
            families["windows"].add_metric(key, int(windows or 0))
            families["requests"].add_metric(key, int(requests or 0))
            families["errors"].add_metric(key, int(errors or 0))
            families["attributed"].add_metric(key, int(attributed or 0))
            total += int(requests or 0)
            known += int(attributed or 0)
        yield from families.values()
        coverage = GaugeMetricFamily(
            "edgeota_telemetry_attribution_coverage",
            "Share of all reported requests whose release is known (1 with no requests; goal 1).",
        )
        coverage.add_metric([], known / total if total else 1.0)
        yield coverage


def exposition(session: Session, counters: Mapping[str, int], cohort_label: str) -> bytes:
    """The Prometheus text exposition of one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(session, counters, cohort_label))
    return generate_latest(registry)
