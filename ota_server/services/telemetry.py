"""Telemetry aggregation for rollout gates: merge stored windows, compare with the baseline and reference."""

from __future__ import annotations

import json
import tarfile
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.manifest import REFERENCE_STATS_FILE
from ota_server.artifacts import ArtifactStore
from ota_server.models import Bundle, Deployment, Rollout, TelemetryRecord
from ota_server.rollout.plan import Plan
from ota_server.rollout.telemetry_gates import TelemetryTotals, max_psi, shadow_gate_failure, telemetry_gate_failure

_REFERENCE_CACHE: dict[str, list[dict[str, Any]]] = {}


def reference_features(store: ArtifactStore, sha256: str) -> list[dict[str, Any]]:
    """The ``features`` of a stored bundle's reference_stats.json ([] when absent or unreadable)."""
    if sha256 not in _REFERENCE_CACHE:
        features: list[dict[str, Any]] = []
        try:
            with tarfile.open(store.local_path(sha256), mode="r:") as tar:
                member = tar.extractfile(REFERENCE_STATS_FILE)
                if member is not None:
                    features = list(json.loads(member.read()).get("features", []))
        except (OSError, KeyError, tarfile.TarError, ValueError):
            features = []
        if len(_REFERENCE_CACHE) > 256:
            _REFERENCE_CACHE.clear()
        _REFERENCE_CACHE[sha256] = features
    return _REFERENCE_CACHE[sha256]


def _totals(session: Session, shas: set[str], devices: set[str]) -> dict[str, TelemetryTotals]:
    out: dict[str, TelemetryTotals] = {}
    if not shas or not devices:
        return out
    rows = session.scalars(
        select(TelemetryRecord).where(TelemetryRecord.bundle_sha256.in_(shas), TelemetryRecord.device_id.in_(devices))
    )
    for row in rows:
        out.setdefault(row.bundle_sha256, TelemetryTotals()).add_window(row.payload, row.device_id)
    return out


def _merge(parts: dict[str, TelemetryTotals]) -> TelemetryTotals:
    total = TelemetryTotals()
    for part in parts.values():
        total.merge(part)
    return total


def rollout_telemetry_failure(session: Session, store: ArtifactStore, rollout: Rollout) -> str | None:
    """Evaluate the plan's telemetry gates on what the rollout's devices reported; None when all pass."""
    gates = Plan.from_json(rollout.plan).gates
    wanted = (gates.max_error_rate, gates.max_p95_latency_ratio, gates.max_drift_psi, gates.min_shadow_agreement)
    if all(g is None for g in wanted):
        return None
    installs = list(
        session.scalars(select(Deployment).where(Deployment.rollout_id == rollout.id, Deployment.mode == "install"))
    )
    devices = {d.device_id for d in installs}
    new_shas = set(session.scalars(select(Bundle.sha256).where(Bundle.release_id == rollout.release_id)))
    old_shas = {d.previous_bundle_sha256 for d in installs if d.previous_bundle_sha256}
    new_parts = _totals(session, new_shas, devices)
    baseline = _merge(_totals(session, old_shas, devices)) if gates.max_p95_latency_ratio is not None else None
    drift: float | None = None
    if gates.max_drift_psi is not None:
        for sha, part in new_parts.items():
            value = max_psi(reference_features(store, sha), part.features)
            if value is not None:
                drift = value if drift is None else max(drift, value)
    failure = telemetry_gate_failure(gates, _merge(new_parts), baseline, drift)
    if failure is None and gates.min_shadow_agreement is not None:
        failure = shadow_gate_failure(gates, _shadow_totals(session, new_shas, devices))
    return failure


def _shadow_totals(session: Session, candidate_shas: set[str], devices: set[str]) -> TelemetryTotals:
    """Shadow summaries about the candidate bundles, from windows of whatever model the devices serve."""
    total = TelemetryTotals()
    if not devices:
        return total
    rows = session.scalars(select(TelemetryRecord.payload).where(TelemetryRecord.device_id.in_(devices)))
    for payload in rows:
        shadow = payload.get("shadow")
        if shadow and shadow.get("candidate_bundle_sha256") in candidate_shas:
            total.add_shadow(shadow)
    return total
