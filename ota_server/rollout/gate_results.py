"""Telemetry gates that say what they know: one typed :class:`GateResult` per configured gate.

:func:`evaluate_gates` is pure: it reads merged telemetry (:class:`~ota_server.rollout.telemetry_gates.TelemetryTotals`)
and the drift inputs the service gathered, and returns for every gate the plan sets either ``passed``
(value within threshold), ``failed`` (value, threshold and why) or ``not_evaluated`` (``have`` of ``need``
requests, values or comparisons). :func:`ota_server.rollout.engine_logic.decide` halts on a failed gate
at once, and lets a stage pass only when every gate passed, or when its wait for data has ended and the
plan opts to pass (then says which gates were not evaluated).

Minimum data: ``min_telemetry_requests`` counts requests for the error-rate, non-finite-output and
latency gates (the latency gate needs it on the baseline too) and comparisons for the shadow gate. The
drift gate counts VALUES per feature (devices summarise a sample of requests): it needs
``min_drift_values`` (default: the drift rule's ``min_values``) on at least one feature, judged by
:func:`ota_server.drift.evaluate_drift`; it fails on an overall level ``drift``. ``max_drift_psi`` keeps
its name and becomes the drift rule's effect-size floor (``drift_min_psi``): a significant shift smaller
than it is not ``drift``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ota_server.drift import DriftConfig, DriftKey, DriftReport, evaluate_drift
from ota_server.rollout.plan import Gates
from ota_server.rollout.telemetry_gates import TelemetryTotals

GateState = Literal["passed", "failed", "not_evaluated"]
GATE_NAMES = ("error_rate", "nan_output_rate", "p95_latency_ratio", "drift", "shadow_agreement")
DEFAULT_DATA_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict. ``value`` and ``threshold`` are None where they are not numbers (JSON has no inf)."""

    name: str
    state: GateState
    threshold: float | None
    value: float | None = None
    have: int | None = None
    need: int | None = None
    unit: str = "requests"
    detail: str = ""

    def describe(self) -> str:
        """``gate drift not evaluated: 37 of 200 values`` / ``gate error_rate failed: error rate 0.4 over 0.1``."""
        if self.state == "not_evaluated":
            return f"gate {self.name} not evaluated: {self.have or 0} of {self.need or 0} {self.unit}"
        return f"gate {self.name} {self.state}: {self.detail}"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "value": self.value,
            "threshold": self.threshold,
            "have": self.have,
            "need": self.need,
            "unit": self.unit,
            "detail": self.detail,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GateResult:
        return cls(
            name=str(data["name"]),
            state=data["state"],
            threshold=data.get("threshold"),
            value=data.get("value"),
            have=data.get("have"),
            need=data.get("need"),
            unit=str(data.get("unit", "requests")),
            detail=str(data.get("detail", "")),
        )


@dataclass(frozen=True)
class DriftInput:
    """One bundle's input histograms: its reference (from ``reference_stats.json``) and what devices observed."""

    reference: Mapping[DriftKey, Sequence[int]]
    observed: Mapping[DriftKey, Sequence[int]]


@dataclass(frozen=True)
class GateInputs:
    """What the gates read, gathered by :mod:`ota_server.services.telemetry`."""

    new: TelemetryTotals
    """Telemetry of the release's bundles."""
    baseline: TelemetryTotals | None = None
    """Telemetry of the bundles the rollout's devices ran before (the latency gate's reference)."""
    drift: Mapping[str, DriftInput] = field(default_factory=dict)
    """Per bundle sha with reference stats."""
    shadow: tuple[int, int] = (0, 0)
    """``(compared, top1_agree)`` of devices shadowing the release."""


def configured(gates: Gates) -> tuple[str, ...]:
    """Names of the telemetry gates ``gates`` sets, in :data:`GATE_NAMES` order."""
    values = {
        "error_rate": gates.max_error_rate,
        "nan_output_rate": gates.max_nan_output_rate,
        "p95_latency_ratio": gates.max_p95_latency_ratio,
        "drift": gates.max_drift_psi,
        "shadow_agreement": gates.min_shadow_agreement,
    }
    return tuple(name for name in GATE_NAMES if values[name] is not None)


def drift_config(gates: Gates) -> DriftConfig:
    """The drift rule for the gate: ``max_drift_psi`` is the effect-size floor, ``min_drift_values`` the minimum."""
    cfg = DriftConfig()
    if gates.max_drift_psi is not None:
        floor = gates.max_drift_psi
        cfg = replace(cfg, drift_min_psi=floor, watch_min_psi=min(cfg.watch_min_psi, floor))
    if gates.min_drift_values is not None:
        cfg = replace(cfg, min_values=gates.min_drift_values)
    return cfg


def data_timeout_seconds(gates: Gates, soak_seconds: float) -> float:
    """How long a stage waits after its soak for gates without enough data (see ``Gates.gate_data_timeout_seconds``)."""
    if gates.gate_data_timeout_seconds is not None:
        return gates.gate_data_timeout_seconds
    return max(DEFAULT_DATA_TIMEOUT_SECONDS, soak_seconds)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _requests_gate(name: str, gates: Gates, new: TelemetryTotals, threshold: float) -> GateResult | None:
    need = max(1, gates.min_telemetry_requests)
    if new.requests < need:
        return GateResult(name, "not_evaluated", threshold, None, new.requests, need, "requests")
    return None


def _error_rate(gates: Gates, new: TelemetryTotals, threshold: float) -> GateResult:
    waiting = _requests_gate("error_rate", gates, new, threshold)
    if waiting is not None:
        return waiting
    rate = new.errors / new.requests
    ok = rate <= threshold
    detail = f"error rate {rate:.3f} {'within' if ok else 'over'} {threshold:.3f} after {new.requests} requests"
    return GateResult(
        "error_rate", "passed" if ok else "failed", threshold, rate, new.requests, None, "requests", detail
    )


def _nan_rate(gates: Gates, new: TelemetryTotals, threshold: float) -> GateResult:
    waiting = _requests_gate("nan_output_rate", gates, new, threshold)
    if waiting is not None:
        return waiting
    served = max(1, new.requests - new.errors)
    rate = new.nan_outputs / served
    ok = not new.nan_outputs or rate <= threshold
    detail = (
        f"{new.nan_outputs} non-finite output values in {served} requests"
        f" ({rate:.3f} per request, {'within' if ok else 'over'} {threshold:g})"
    )
    return GateResult(
        "nan_output_rate", "passed" if ok else "failed", threshold, rate, new.requests, None, "requests", detail
    )


def _latency(gates: Gates, new: TelemetryTotals, baseline: TelemetryTotals | None, threshold: float) -> GateResult:
    need = max(1, gates.min_telemetry_requests)
    old_requests = baseline.requests if baseline is not None else 0
    have = min(new.requests, old_requests)
    if have < need:
        which = "the new release" if new.requests < need else "the baseline (what the devices ran before)"
        detail = f"{which}: new {new.requests}, baseline {old_requests} of {need} requests"
        return GateResult("p95_latency_ratio", "not_evaluated", threshold, None, have, need, "requests", detail)
    assert baseline is not None
    new_p95, old_p95 = new.p95_ms, baseline.p95_ms
    if new_p95 is None or old_p95 is None or old_p95 <= 0:
        return GateResult(
            "p95_latency_ratio", "not_evaluated", threshold, None, 0, need, "requests", "no latency histogram"
        )
    ratio = new_p95 / old_p95
    ok = ratio <= threshold
    detail = f"p95 latency {new_p95:g} ms is {ratio:.2f}x the previous {old_p95:g} ms ({'within' if ok else 'over'} {threshold:g}x)"
    state: GateState = "passed" if ok else "failed"
    return GateResult("p95_latency_ratio", state, threshold, _finite(ratio), have, None, "requests", detail)


def _drift(gates: Gates, drift: Mapping[str, DriftInput], threshold: float) -> GateResult:
    cfg = drift_config(gates)
    if not drift:
        detail = "no reference stats for the release's bundles"
        return GateResult("drift", "not_evaluated", threshold, None, 0, cfg.min_values, "values", detail)
    reports = [evaluate_drift(d.reference, d.observed, cfg) for _, d in sorted(drift.items())]
    evaluated = [r for r in reports if r.level != "insufficient"]
    if not evaluated:
        most = max((f.n for r in reports for f in r.features), default=0)
        detail = f"{most} of {cfg.min_values} values on the best-sampled feature"
        return GateResult("drift", "not_evaluated", threshold, None, most, cfg.min_values, "values", detail)
    worst = _worst(evaluated)
    psis = [f.psi for r in evaluated for f in r.features if f.psi is not None and f.level == worst.level]
    value = max(psis) if psis else None
    fewest = min(f.n for r in evaluated for f in r.features if f.level != "insufficient")
    state: GateState = "failed" if worst.level == "drift" else "passed"
    detail = f"input drift {worst.level}: {worst.summary()}"
    return GateResult("drift", state, threshold, value, fewest, None, "values", detail)


def _worst(reports: Sequence[DriftReport]) -> DriftReport:
    order = {"drift": 0, "watch": 1, "stable": 2, "insufficient": 3}
    return min(reports, key=lambda r: order[r.level])


def _shadow(gates: Gates, shadow: tuple[int, int], threshold: float) -> GateResult:
    compared, agree = shadow
    need = max(1, gates.min_telemetry_requests)
    if compared < need:
        return GateResult("shadow_agreement", "not_evaluated", threshold, None, compared, need, "comparisons")
    agreement = agree / compared
    ok = agreement >= threshold
    detail = (
        f"shadow agreement {agreement:.3f} {'at or over' if ok else 'under'} {threshold:.3f} in {compared} comparisons"
    )
    return GateResult(
        "shadow_agreement", "passed" if ok else "failed", threshold, agreement, compared, None, "comparisons", detail
    )


def evaluate_gates(gates: Gates, inputs: GateInputs) -> tuple[GateResult, ...]:
    """One result per telemetry gate ``gates`` sets (:func:`configured`), in :data:`GATE_NAMES` order.

    Never raises for missing data: a gate without enough is ``not_evaluated`` with ``have`` of ``need``.
    """
    out: list[GateResult] = []
    for name in configured(gates):
        if name == "error_rate":
            assert gates.max_error_rate is not None
            out.append(_error_rate(gates, inputs.new, gates.max_error_rate))
        elif name == "nan_output_rate":
            assert gates.max_nan_output_rate is not None
            out.append(_nan_rate(gates, inputs.new, gates.max_nan_output_rate))
        elif name == "p95_latency_ratio":
            assert gates.max_p95_latency_ratio is not None
            out.append(_latency(gates, inputs.new, inputs.baseline, gates.max_p95_latency_ratio))
        elif name == "drift":
            assert gates.max_drift_psi is not None
            out.append(_drift(gates, inputs.drift, gates.max_drift_psi))
        else:
            assert gates.min_shadow_agreement is not None
            out.append(_shadow(gates, inputs.shadow, gates.min_shadow_agreement))
    return tuple(out)


def failed(results: Sequence[GateResult]) -> tuple[GateResult, ...]:
    return tuple(r for r in results if r.state == "failed")


def not_evaluated(results: Sequence[GateResult]) -> tuple[GateResult, ...]:
    return tuple(r for r in results if r.state == "not_evaluated")
