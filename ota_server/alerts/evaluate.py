"""Pure rule evaluation: aggregated telemetry and field accuracy in, one :class:`Observation` per rule x scope out.

Each observation says whether the rule's condition holds (``firing``), clearly does not (``clear``), or cannot
be judged for lack of data (``insufficient``: neither fires nor resolves anything). Every observation carries
a fingerprint (rule x model x version x profile x cohort, x feature for per-feature drift rules) that the
lifecycle (:mod:`ota_server.alerts.lifecycle`) uses to de-duplicate. Drift reuses
:func:`ota_server.drift.evaluate_drift` (the rule the gates and the review use) and names the features.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ota_server.alerts.config import AlertRule
from ota_server.drift import DriftConfig, DriftKey, DriftReport, evaluate_drift
from ota_server.rollout.telemetry_gates import TelemetryTotals

Status = Literal["firing", "clear", "insufficient"]
Scope = tuple[str, str, str, str]
"""(model name, version, hardware profile, cohort)."""


@dataclass(frozen=True)
class GroupData:
    """One release x profile x cohort over a rule's window: merged telemetry and the bundle's drift references."""

    scope: Scope
    totals: TelemetryTotals
    reference_inputs: Mapping[DriftKey, Sequence[int]] = field(default_factory=dict)
    reference_outputs: Mapping[DriftKey, Sequence[int]] = field(default_factory=dict)


class AccuracyLike(Protocol):
    """What the accuracy rules read (``ota_server.services.accuracy.AccuracyRow`` has these fields)."""

    @property
    def model_name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def hardware_profile(self) -> str: ...
    @property
    def cohort(self) -> str: ...
    @property
    def labelled(self) -> int: ...
    @property
    def accuracy(self) -> float | None: ...
    @property
    def estimated_accuracy(self) -> float | None: ...
    @property
    def estimate_requests(self) -> int: ...


@dataclass(frozen=True)
class Observation:
    """One rule judged on one scope (and feature, for per-feature drift rules)."""

    rule: str
    fingerprint: str
    scope: Scope
    status: Status
    value: float | None
    threshold: float
    summary: str
    features: tuple[str, ...] = ()
    feature: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


def fingerprint(rule: str, scope: Scope, feature: str | None = None) -> str:
    """Stable id of what an alert is about: sha256 over the canonical JSON of rule, scope and feature (32 hex)."""
    data = json.dumps([rule, *scope, feature or ""], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(data.encode()).hexdigest()[:32]


def in_scope(rule: AlertRule, scope: Scope) -> bool:
    model, version, profile, cohort = scope
    return (
        model == rule.model
        and (rule.version is None or rule.version == version)
        and (rule.profile is None or rule.profile == profile)
        and (rule.cohort is None or rule.cohort == cohort)
    )


def _where(scope: Scope) -> str:
    model, version, profile, cohort = scope
    return f"{model} {version} on {profile}" + (f", cohort {cohort}" if cohort else "")


def _obs(rule: AlertRule, scope: Scope, status: Status, value: float | None, summary: str, **kw: Any) -> Observation:
    feature = kw.pop("feature", None)
    return Observation(
        rule.name,
        fingerprint(rule.name, scope, feature),
        scope,
        status,
        value,
        rule.effective_threshold,
        summary,
        feature=feature,
        **kw,
    )


def _error_rate(rule: AlertRule, g: GroupData) -> Observation:
    t, need, limit = g.totals, rule.effective_min_count, rule.effective_threshold
    if t.requests < need:
        return _obs(rule, g.scope, "insufficient", None, f"{t.requests:,} of {need:,} requests")
    rate = t.errors / t.requests
    status: Status = "firing" if rate > limit else "clear"
    summary = f"error rate {rate:.2%} over {limit:.2%} on {_where(g.scope)} ({t.errors:,} of {t.requests:,} requests)"
    details = {"requests": t.requests, "errors": t.errors}
    return _obs(rule, g.scope, status, rate, summary, details=details)


def _latency(rule: AlertRule, g: GroupData) -> Observation:
    t, need, limit = g.totals, rule.effective_min_count, rule.effective_threshold
    if t.requests < need:
        return _obs(rule, g.scope, "insufficient", None, f"{t.requests:,} of {need:,} requests")
    p95 = t.p95_ms
    if p95 is None:
        return _obs(rule, g.scope, "insufficient", None, "no latency histogram")
    status: Status = "firing" if p95 > limit else "clear"
    shown = "beyond the last latency bucket" if math.isinf(p95) else f"{p95:g} ms"
    summary = f"p95 latency {shown} over {limit:g} ms on {_where(g.scope)} ({t.requests:,} requests)"
    # JSON has no infinity: a p95 past the last bucket edge is recorded as None with the flag below.
    value = None if math.isinf(p95) else p95
    return _obs(rule, g.scope, status, value, summary, details={"requests": t.requests, "p95_overflow": value is None})


def _drift_config(rule: AlertRule) -> DriftConfig:
    floor = rule.effective_threshold
    return DriftConfig(min_values=rule.effective_min_count, drift_min_psi=floor, watch_min_psi=min(0.05, floor))


def _observed(g: GroupData) -> tuple[dict[DriftKey, list[int]], dict[DriftKey, list[int]]]:
    from ota_server.drift import class_key, confidence_key, feature_key

    t = g.totals
    inputs = {feature_key(name, index): counts for (name, index), counts in t.features.items()}
    outputs = {class_key(name): counts for name, counts in t.outputs.items()}
    outputs.update({confidence_key(name): counts for name, counts in t.confidence.items()})

    def same(ref: Mapping[DriftKey, Sequence[int]], obs: dict[DriftKey, list[int]]) -> dict[DriftKey, list[int]]:
        return {k: v for k, v in obs.items() if k in ref and len(ref[k]) == len(v)}

    return same(g.reference_inputs, inputs), same(g.reference_outputs, outputs)


def _drift(rule: AlertRule, g: GroupData) -> list[Observation]:
    if not g.reference_inputs and not g.reference_outputs:
        return [_obs(rule, g.scope, "insufficient", None, "the bundle has no reference stats")]
    cfg = _drift_config(rule)
    observed_in, observed_out = _observed(g)
    reports: list[DriftReport] = []
    for ref, obs in ((g.reference_inputs, observed_in), (g.reference_outputs, observed_out)):
        if ref:  # inputs and outputs are separate families, as in the summary
            reports.append(evaluate_drift(ref, obs, cfg))
    drifting = [f for r in reports for f in r.of_level("drift")]
    judged = sum(r.evaluated for r in reports)
    report_json = {"families": [r.as_json() for r in reports]}
    if rule.per_feature:  # one observation per histogram, so a feature that stops drifting resolves its alert
        return [
            _obs(
                rule,
                g.scope,
                "firing" if f.level == "drift" else "insufficient" if f.level == "insufficient" else "clear",
                f.psi,
                f"drift on {f.describe()} on {_where(g.scope)}" if f.level == "drift" else f.describe(),
                features=(f.label,) if f.level == "drift" else (),
                feature=f.label,
                details={"drift_report": report_json} if f.level == "drift" else {},
            )
            for r in reports
            for f in r.features
        ]
    if not drifting:
        if judged == 0:
            fewest = min((r.fewest_values for r in reports if r.fewest_values is not None), default=0)
            return [_obs(rule, g.scope, "insufficient", None, f"{fewest:,} of {cfg.min_values:,} values")]
        summary = "; ".join(r.summary() for r in reports)
        return [_obs(rule, g.scope, "clear", 0.0, summary, details={"drift_report": report_json})]
    names = tuple(f.label for f in drifting)
    listed = ", ".join(f.describe() for f in drifting[:3]) + (
        f" and {len(drifting) - 3} more" if len(drifting) > 3 else ""
    )
    top = max((f.psi or 0.0) for f in drifting)
    summary = f"drift on {listed} on {_where(g.scope)}"
    return [_obs(rule, g.scope, "firing", top, summary, features=names, details={"drift_report": report_json})]


def _accuracy(rule: AlertRule, row: AccuracyLike) -> Observation:
    scope: Scope = (row.model_name, row.version, row.hardware_profile, row.cohort)
    need, limit = rule.effective_min_count, rule.effective_threshold
    if rule.kind == "accuracy":
        n, value, what = row.labelled, row.accuracy, "labelled predictions"
        name = "accuracy"
    else:
        n, value, what = row.estimate_requests, row.estimated_accuracy, "predictions with a confidence"
        name = "estimated accuracy"
    if value is None or n < need:
        return _obs(rule, scope, "insufficient", None, f"{n:,} of {need:,} {what}")
    status: Status = "firing" if value < limit else "clear"
    summary = f"{name} {value:.1%} under {limit:.1%} on {_where(scope)} ({n:,} {what})"
    return _obs(rule, scope, status, value, summary, details={"n": n})


def evaluate_rule(
    rule: AlertRule, groups: Iterable[GroupData], accuracy: Iterable[AccuracyLike] = ()
) -> list[Observation]:
    """Every observation of ``rule`` over the groups (telemetry kinds) or accuracy rows (accuracy kinds) in scope.

    Pure: reads only its arguments. Groups out of the rule's scope are ignored.
    """
    out: list[Observation] = []
    if rule.kind in ("accuracy", "estimated_accuracy"):
        for row in accuracy:
            if in_scope(rule, (row.model_name, row.version, row.hardware_profile, row.cohort)):
                out.append(_accuracy(rule, row))
        return out
    for g in groups:
        if not in_scope(rule, g.scope):
            continue
        if rule.kind == "error_rate":
            out.append(_error_rate(rule, g))
        elif rule.kind == "latency_p95":
            out.append(_latency(rule, g))
        else:
            out.extend(_drift(rule, g))
    return out
