"""Merged (additive) telemetry: what the gates, the fleet summary and the aggregates table share.

:class:`TelemetryTotals` is one set of windows merged by adding counts. Ingest builds one per window
and merges them per aggregate group (:mod:`ota_server.services.telemetry_aggregates`); the gates
(:mod:`ota_server.rollout.gate_results`) and the fleet summary merge the stored groups again, so what
operators read and what gates judge is computed by the same code. Histograms whose bucket count
differs from what is already merged are skipped (never mixed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import add
from typing import Any

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS, histogram_quantile, merge_counts

FeatureKey = tuple[str, int | None]
ShadowKey = tuple[str, str]
"""(candidate version, candidate bundle sha256)."""


def _latency_zero() -> list[int]:
    return [0] * (len(LATENCY_EDGES_MS) + 1)


@dataclass
class TelemetryTotals:
    """Windows of one set of bundles on one set of devices, merged by adding counts."""

    requests: int = 0
    errors: int = 0
    latency_counts: list[int] = field(default_factory=_latency_zero)
    features: dict[FeatureKey, list[int]] = field(default_factory=dict)
    outputs: dict[str, list[int]] = field(default_factory=dict)
    """Class counts per output."""
    confidence: dict[str, list[int]] = field(default_factory=dict)
    """Confidence histograms (on ``CONFIDENCE_EDGES``) per output."""
    nan_outputs: int = 0  # non-finite output values, all outputs
    windows: int = 0
    attributed_requests: int = 0
    """Requests of windows whose bundle sha named a stored bundle (the release is known)."""
    shadows: dict[ShadowKey, list[int]] = field(default_factory=dict)
    """Per shadowed candidate: ``[compared, top1_agree]``."""
    dropped_by_device: dict[str, int] = field(default_factory=dict)
    """Only devices that reported a full spool (their latest cumulative count)."""

    @property
    def spool_dropped(self) -> int:
        """Windows lost to full device spools: per device the largest (cumulative) report, summed."""
        return sum(self.dropped_by_device.values())

    @property
    def shadow_compared(self) -> int:
        return sum(c for c, _ in self.shadows.values())

    @property
    def shadow_agree(self) -> int:
        return sum(a for _, a in self.shadows.values())

    def shadow_of(self, candidate_shas: set[str]) -> tuple[int, int]:
        """``(compared, top1_agree)`` summed over the shadowed candidates among ``candidate_shas``."""
        pairs = [v for (_, sha), v in self.shadows.items() if sha in candidate_shas]
        return sum(c for c, _ in pairs), sum(a for _, a in pairs)

    @property
    def feature_values(self) -> dict[FeatureKey, int]:
        """Values per feature histogram (devices summarise a sample of their requests: values, not requests)."""
        return {key: sum(counts) for key, counts in self.features.items()}

    def merge(self, other: TelemetryTotals) -> None:
        """Add every count of ``other`` into this one (histograms with other bucket counts are skipped)."""
        self.requests += other.requests
        self.errors += other.errors
        self.nan_outputs += other.nan_outputs
        self.windows += other.windows
        self.attributed_requests += other.attributed_requests
        if len(other.latency_counts) == len(self.latency_counts):
            self.latency_counts = merge_counts(self.latency_counts, other.latency_counts)
        _merge_into(self.features, other.features)
        _merge_into(self.outputs, other.outputs)
        _merge_into(self.confidence, other.confidence)
        for key, (compared, agree) in other.shadows.items():
            old = self.shadows.setdefault(key, [0, 0])
            old[0] += compared
            old[1] += agree
        for device, dropped in other.dropped_by_device.items():
            self.dropped_by_device[device] = max(dropped, self.dropped_by_device.get(device, 0))

    def add_shadow(self, shadow: Mapping[str, Any]) -> None:
        """Add the shadow summary of a window in which the candidate ran beside the serving model."""
        version, sha, compared, agree = _shadow_values(shadow)
        old = self.shadows.setdefault((version, sha), [0, 0])
        old[0] += compared
        old[1] += agree

    def add_window(self, window: Mapping[str, Any], device_id: str = "", attributed: bool = True) -> None:
        """Add one ``TelemetryWindow`` (as JSON). Histograms with other bucket counts are skipped."""
        outputs = window.get("outputs", [])
        shadow = window.get("shadow")
        self._add_counts(
            int(window.get("request_count", 0)),
            int(window.get("error_count", 0)),
            window.get("latency_counts") or [],
            {(str(f.get("input")), f.get("feature")): f.get("counts", []) for f in window.get("features", [])},
            {str(o.get("output")): o["class_counts"] for o in outputs if o.get("class_counts")},
            {str(o.get("output")): o["confidence_counts"] for o in outputs if o.get("confidence_counts")},
            sum(int(o.get("nan_count", 0)) for o in outputs),
            _shadow_values(shadow) if shadow else None,
            int(window.get("spool_dropped", 0)),
            device_id,
            attributed,
        )

    def add_window_model(self, window: TelemetryWindow, device_id: str = "", attributed: bool = True) -> None:
        """:meth:`add_window` for a parsed window (the same counts, read from its attributes: ingest's fast path
        adds a window without building its JSON)."""
        outputs = window.outputs
        shadow = window.shadow
        self._add_counts(
            window.request_count,
            window.error_count,
            window.latency_counts,
            {(f.input, f.feature): f.counts for f in window.features},
            {o.output: o.class_counts for o in outputs if o.class_counts},
            {o.output: o.confidence_counts for o in outputs if o.confidence_counts},
            sum(o.nan_count for o in outputs),
            None
            if shadow is None
            else (shadow.candidate_version, shadow.candidate_bundle_sha256, shadow.compared, shadow.top1_agree),
            window.spool_dropped,
            device_id,
            attributed,
        )

    def _add_counts(
        self,
        requests: int,
        errors: int,
        latency: Sequence[int],
        features: Mapping[FeatureKey, Sequence[int]],
        classes: Mapping[str, Sequence[int]],
        confidence: Mapping[str, Sequence[int]],
        nan_outputs: int,
        shadow: tuple[str, str, int, int] | None,
        dropped: int,
        device_id: str,
        attributed: bool,
    ) -> None:
        self.windows += 1
        self.requests += requests
        self.attributed_requests += requests if attributed else 0
        self.errors += errors
        if len(latency) == len(self.latency_counts):
            self.latency_counts = list(map(add, self.latency_counts, latency))
        _merge_into(self.features, features)
        _merge_into(self.outputs, classes)
        _merge_into(self.confidence, confidence)
        self.nan_outputs += nan_outputs
        if shadow is not None:
            old = self.shadows.setdefault((shadow[0], shadow[1]), [0, 0])
            old[0] += shadow[2]
            old[1] += shadow[3]
        if dropped:
            self.dropped_by_device[device_id] = max(dropped, self.dropped_by_device.get(device_id, 0))

    def latency_quantile_ms(self, q: float) -> float | None:
        """Upper edge of the latency bucket holding quantile ``q`` (inf past the last edge; None if empty)."""
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_counts, q)

    @property
    def p95_ms(self) -> float | None:
        return histogram_quantile(LATENCY_EDGES_MS, self.latency_counts, 0.95)

    def histograms_json(self) -> dict[str, Any]:
        """Feature, output and spool-drop histograms as plain JSON (``telemetry_aggregates.histograms``; latency
        and shadow counts have columns of their own); :meth:`from_row` reads it back."""
        return {
            "features": [
                [name, feature, counts] for (name, feature), counts in sorted(self.features.items(), key=_fkey)
            ],
            "outputs": {name: counts for name, counts in sorted(self.outputs.items())},
            "confidence": {name: counts for name, counts in sorted(self.confidence.items())},
            "dropped": dict(sorted(self.dropped_by_device.items())),
        }

    @classmethod
    def from_row(
        cls,
        histograms: Mapping[str, Any] | None,
        latency_counts: Sequence[int] | None,
        *,
        windows: int,
        requests: int,
        errors: int,
        nan_outputs: int,
        attributed_requests: int,
        shadow: tuple[str, str, int, int] | None = None,
    ) -> TelemetryTotals:
        """Totals from a stored aggregate row: its scalar columns, latency counts, :meth:`histograms_json` (None:
        counts only) and shadow ``(candidate version, candidate sha, compared, agree)``."""
        histograms = histograms or {}
        latency = list(latency_counts or [])
        shadows = {(shadow[0], shadow[1]): [shadow[2], shadow[3]]} if shadow and shadow[1] else {}
        return cls(
            requests=int(requests),
            errors=int(errors),
            latency_counts=latency if len(latency) == len(LATENCY_EDGES_MS) + 1 else _latency_zero(),
            features={(str(n), f): list(c) for n, f, c in histograms.get("features", [])},
            outputs={str(k): list(v) for k, v in (histograms.get("outputs") or {}).items()},
            confidence={str(k): list(v) for k, v in (histograms.get("confidence") or {}).items()},
            nan_outputs=int(nan_outputs),
            windows=int(windows),
            attributed_requests=int(attributed_requests),
            shadows=shadows,
            dropped_by_device={str(k): int(v) for k, v in (histograms.get("dropped") or {}).items()},
        )


def _fkey(item: tuple[FeatureKey, list[int]]) -> tuple[str, int]:
    (name, feature), _ = item
    return name, -1 if feature is None else feature


def _shadow_values(shadow: Mapping[str, Any]) -> tuple[str, str, int, int]:
    """(candidate version, candidate sha, compared, top1 agree) of a window's shadow summary as JSON."""
    return (
        str(shadow.get("candidate_version", "")),
        str(shadow.get("candidate_bundle_sha256", "")),
        int(shadow.get("compared", 0)),
        int(shadow.get("top1_agree", 0)),
    )


def _merge_into(target: dict[Any, list[int]], extra: Mapping[Any, Sequence[int]]) -> None:
    # The hot loop of every review, gate read and ingest batch: map(add) runs in C, a new list per key (the
    # caller's lists are never changed), no per-call checks beyond the length.
    for key, counts in extra.items():
        old = target.get(key)
        if old is None:
            target[key] = list(counts)
        elif len(old) == len(counts):
            target[key] = list(map(add, old, counts))


def merge_all(parts: Sequence[TelemetryTotals] | Mapping[Any, TelemetryTotals]) -> TelemetryTotals:
    """One :class:`TelemetryTotals` holding every part's counts."""
    total = TelemetryTotals()
    for part in parts.values() if isinstance(parts, Mapping) else parts:
        total.merge(part)
    return total
