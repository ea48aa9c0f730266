"""Telemetry gates as pure functions over merged (additive) telemetry summaries.

:class:`TelemetryTotals` and :func:`feature_psi` also back the fleet telemetry summary API, so the
gates and what operators read are computed by the same code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeota_contract.telemetry import LATENCY_EDGES_MS, histogram_quantile, merge_counts, psi
from ota_server.rollout.plan import Gates

FeatureKey = tuple[str, int | None]
PSI_WATCH = 0.1
PSI_ACT = 0.25


def drift_label(value: float) -> str:
    """``stable`` below 0.1, ``watch`` up to 0.25, ``act`` above (the usual PSI reading)."""
    if value > PSI_ACT:
        return "act"
    return "watch" if value >= PSI_WATCH else "stable"


@dataclass
class TelemetryTotals:
    """Windows of one set of bundles on one set of devices, merged by adding counts."""

    requests: int = 0
    errors: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    features: dict[FeatureKey, list[int]] = field(default_factory=dict)
    shadow_compared: int = 0
    shadow_agree: int = 0
    outputs: dict[str, list[int]] = field(default_factory=dict)
    nan_outputs: int = 0  # non-finite output values, all outputs
    windows: int = 0
    dropped_by_device: dict[str, int] = field(default_factory=dict)

    @property
    def spool_dropped(self) -> int:
        """Windows lost to full device spools: per device the largest (cumulative) report, summed."""
        return sum(self.dropped_by_device.values())

    def merge(self, other: TelemetryTotals) -> None:
        """Add every count of ``other`` into this one (histograms with other bucket counts are skipped)."""
        self.requests += other.requests
        self.errors += other.errors
        self.nan_outputs += other.nan_outputs
        self.windows += other.windows
        self.latency_counts = merge_counts(self.latency_counts, other.latency_counts)
        _merge_into(self.features, other.features)
        _merge_into(self.outputs, other.outputs)
        self.shadow_compared += other.shadow_compared
        self.shadow_agree += other.shadow_agree
        for device, dropped in other.dropped_by_device.items():
            self.dropped_by_device[device] = max(dropped, self.dropped_by_device.get(device, 0))

    def add_shadow(self, shadow: Mapping[str, Any]) -> None:
        """Add the shadow summary of a window in which the candidate ran beside the serving model."""
        self.shadow_compared += int(shadow.get("compared", 0))
        self.shadow_agree += int(shadow.get("top1_agree", 0))

    def add_window(self, window: Mapping[str, Any], device_id: str = "") -> None:
        """Add one stored ``TelemetryWindow`` (as JSON). Histograms with other bucket counts are skipped."""
        self.windows += 1
        self.requests += int(window.get("request_count", 0))
        self.errors += int(window.get("error_count", 0))
        latency = window.get("latency_counts") or []
        if len(latency) == len(self.latency_counts):
            self.latency_counts = merge_counts(self.latency_counts, latency)
        features = {
            (str(f.get("input")), f.get("feature")): list(f.get("counts", [])) for f in window.get("features", [])
        }
        _merge_into(self.features, features)
        outputs = {
            str(o.get("output")): list(o["class_counts"]) for o in window.get("outputs", []) if o.get("class_counts")
        }
        _merge_into(self.outputs, outputs)
        self.nan_outputs += sum(int(o.get("nan_count", 0)) for o in window.get("outputs", []))
        dropped = int(window.get("spool_dropped", 0))
        self.dropped_by_device[device_id] = max(dropped, self.dropped_by_device.get(device_id, 0))

    def latency_quantile_ms(self, q: float) -> float | None:
        """Upper edge of the latency bucket holding quantile ``q`` (inf past the last edge; None if empty)."""
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_counts, q)

    @property
    def p95_ms(self) -> float | None:
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_counts, 0.95)


def _merge_into(target: dict[Any, list[int]], extra: Mapping[Any, Sequence[int]]) -> None:
    for key, counts in extra.items():
        old = target.get(key)
        if old is None:
            target[key] = list(counts)
        elif len(old) == len(counts):
            target[key] = merge_counts(old, counts)


def feature_psi(
    reference: Iterable[Mapping[str, Any]], live: Mapping[FeatureKey, Sequence[int]]
) -> list[tuple[FeatureKey, float]]:
    """PSI of every feature present in both the reference stats and the live counts, worst first."""
    out: list[tuple[FeatureKey, float]] = []
    for ref in reference:
        key = (str(ref.get("input")), ref.get("feature"))
        counts = live.get(key)
        ref_counts = ref.get("counts") or []
        if counts is None or len(counts) != len(ref_counts) or sum(counts) == 0:
            continue
        out.append((key, psi(ref_counts, counts)))
    out.sort(key=lambda item: -item[1])
    return out


def max_psi(reference: Iterable[Mapping[str, Any]], live: Mapping[FeatureKey, Sequence[int]]) -> float | None:
    """The largest PSI over the features present in both the reference stats and the live counts."""
    values = feature_psi(reference, live)
    return values[0][1] if values else None


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
    if gates.max_nan_output_rate is not None and new.nan_outputs:
        served = max(1, new.requests - new.errors)
        rate = new.nan_outputs / served
        if rate > gates.max_nan_output_rate:
            return (
                f"{new.nan_outputs} non-finite output values in {served} requests"
                f" ({rate:.3f} per request, over {gates.max_nan_output_rate:g})"
            )
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
