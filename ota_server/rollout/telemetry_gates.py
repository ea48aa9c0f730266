"""Telemetry gates as pure functions over merged (additive) telemetry summaries."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeota_contract.telemetry import LATENCY_EDGES_MS, histogram_quantile, merge_counts, psi
from ota_server.rollout.plan import Gates

FeatureKey = tuple[str, int | None]


@dataclass
class TelemetryTotals:
    """Windows of one set of bundles on one set of devices, merged by adding counts."""

    requests: int = 0
    errors: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    features: dict[FeatureKey, list[int]] = field(default_factory=dict)
    shadow_compared: int = 0
    shadow_agree: int = 0

    def add_shadow(self, shadow: Mapping[str, Any]) -> None:
        """Add the shadow summary of a window in which the candidate ran beside the serving model."""
        self.shadow_compared += int(shadow.get("compared", 0))
        self.shadow_agree += int(shadow.get("top1_agree", 0))

    def add_window(self, window: Mapping[str, Any]) -> None:
        """Add one stored ``TelemetryWindow`` (as JSON). Windows with other bucket counts are skipped."""
        self.requests += int(window.get("request_count", 0))
        self.errors += int(window.get("error_count", 0))
        latency = window.get("latency_counts") or []
        if len(latency) == len(self.latency_counts):
            self.latency_counts = merge_counts(self.latency_counts, latency)
        for feature in window.get("features", []):
            key = (str(feature.get("input")), feature.get("feature"))
            counts = list(feature.get("counts", []))
            old = self.features.get(key)
            if old is None:
                self.features[key] = counts
            elif len(old) == len(counts):
                self.features[key] = merge_counts(old, counts)

    @property
    def p95_ms(self) -> float | None:
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_counts, 0.95)


def max_psi(reference: Iterable[Mapping[str, Any]], live: Mapping[FeatureKey, Sequence[int]]) -> float | None:
    """The largest PSI over the features present in both the reference stats and the live counts."""
    worst: float | None = None
    for ref in reference:
        counts = live.get((str(ref.get("input")), ref.get("feature")))
        ref_counts = ref.get("counts") or []
        if counts is None or len(counts) != len(ref_counts) or sum(counts) == 0:
            continue
        value = psi(ref_counts, counts)
        worst = value if worst is None else max(worst, value)
    return worst


def telemetry_gate_failure(
    gates: Gates, new: TelemetryTotals, baseline: TelemetryTotals | None, drift_psi: float | None
) -> str | None:
    """Why the telemetry of the new release fails a gate, or None (also while there is too little data)."""
    if new.requests < max(1, gates.min_telemetry_requests):
        return None
    if gates.max_error_rate is not None:
        rate = new.errors / new.requests
        if rate > gates.max_error_rate:
            return f"error rate {rate:.3f} over {gates.max_error_rate:.3f} after {new.requests} requests"
    if gates.max_p95_latency_ratio is not None and baseline is not None and baseline.requests > 0:
        new_p95, old_p95 = new.p95_ms, baseline.p95_ms
        if new_p95 is not None and old_p95 is not None and old_p95 > 0:
            ratio = new_p95 / old_p95
            if ratio > gates.max_p95_latency_ratio:
                return f"p95 latency {new_p95:g} ms is {ratio:.2f}x the previous {old_p95:g} ms"
    if gates.max_drift_psi is not None and drift_psi is not None and drift_psi > gates.max_drift_psi:
        return f"input drift PSI {drift_psi:.3f} over {gates.max_drift_psi:.3f}"
    return None


def shadow_gate_failure(gates: Gates, shadow: TelemetryTotals) -> str | None:
    """Why the candidate's shadow agreement fails the gate, or None (also with too few comparisons)."""
    if gates.min_shadow_agreement is None or shadow.shadow_compared < max(1, gates.min_telemetry_requests):
        return None
    agreement = shadow.shadow_agree / shadow.shadow_compared
    if agreement < gates.min_shadow_agreement:
        return f"shadow agreement {agreement:.3f} under {gates.min_shadow_agreement:.3f}"
    return None
