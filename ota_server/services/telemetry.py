"""Telemetry aggregation for rollout gates: merge stored windows, compare with the baseline and reference."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from edgeota_contract.manifest import REFERENCE_STATS_FILE
from ota_server.artifacts import ArtifactStore
from ota_server.models import Bundle, Deployment, Rollout, TelemetryRecord
from ota_server.rollout.plan import Gates, Plan
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


def _totals(session: Session, shas: set[str], devices: Select[str]) -> dict[str, TelemetryTotals]:
    out: dict[str, TelemetryTotals] = {}
    if not shas:
        return out
    rows = session.execute(
        select(TelemetryRecord.bundle_sha256, TelemetryRecord.device_id, TelemetryRecord.payload).where(
            TelemetryRecord.bundle_sha256.in_(shas), TelemetryRecord.device_id.in_(devices)
        )
    )
    for sha, device_id, payload in rows:
        out.setdefault(sha, TelemetryTotals()).add_window(payload, device_id)
    return out


def _merge(parts: dict[str, TelemetryTotals]) -> TelemetryTotals:
    total = TelemetryTotals()
    for part in parts.values():
        total.merge(part)
    return total


def _counted(session: Session, shas: set[str], devices: Select[str]) -> TelemetryTotals:
    """Requests and errors of the windows, summed by the database (no payload is read)."""
    if not shas:
        return TelemetryTotals()
    requests, errors = session.execute(
        select(
            func.coalesce(func.sum(TelemetryRecord.request_count), 0),
            func.coalesce(func.sum(TelemetryRecord.error_count), 0),
        ).where(TelemetryRecord.bundle_sha256.in_(shas), TelemetryRecord.device_id.in_(devices))
    ).one()
    return TelemetryTotals(requests=int(requests), errors=int(errors))


def rollout_telemetry_failure(session: Session, store: ArtifactStore, rollout: Rollout) -> str | None:
    """Evaluate the plan's telemetry gates on what the rollout's devices reported; None when all pass.

    The database sums requests and errors first: below ``min_telemetry_requests``, or when the error-rate
    gate is the only one set (or already fails), no window payload is read. Only the latency, drift and
    shadow gates need the histograms in the payloads, and only they read them.
    """
    gates = Plan.from_json(rollout.plan).gates
    wanted = (
        gates.max_error_rate,
        gates.max_nan_output_rate,
        gates.max_p95_latency_ratio,
        gates.max_drift_psi,
        gates.min_shadow_agreement,
    )
    if all(g is None for g in wanted):
        return None
    devices = select(Deployment.device_id).where(Deployment.rollout_id == rollout.id, Deployment.mode == "install")
    new_shas = set(session.scalars(select(Bundle.sha256).where(Bundle.release_id == rollout.release_id)))
    failure: str | None = None
    payload_gates = (gates.max_nan_output_rate, gates.max_p95_latency_ratio, gates.max_drift_psi)
    if gates.max_error_rate is not None or any(g is not None for g in payload_gates):
        counted = _counted(session, new_shas, devices)
        failure = telemetry_gate_failure(
            replace(gates, max_nan_output_rate=None, max_p95_latency_ratio=None, max_drift_psi=None),
            counted,
            None,
            None,
        )
        histograms = any(g is not None for g in payload_gates)
        if failure is None and histograms and counted.requests >= max(1, gates.min_telemetry_requests):
            failure = _histogram_failure(session, store, rollout.id, gates, new_shas, devices)
    if failure is None and gates.min_shadow_agreement is not None:
        device_ids = set(session.scalars(devices))
        failure = shadow_gate_failure(gates, _shadow_totals(session, new_shas, device_ids))
    return failure


def _histogram_failure(
    session: Session,
    store: ArtifactStore,
    rollout_id: str,
    gates: Gates,
    new_shas: set[str],
    devices: Select[str],
) -> str | None:
    """The non-finite-output, latency and drift gates, on the merged window payloads."""
    new_parts = _totals(session, new_shas, devices)
    baseline = None
    if gates.max_p95_latency_ratio is not None:
        old_shas = session.scalars(
            select(Deployment.previous_bundle_sha256).where(
                Deployment.rollout_id == rollout_id,
                Deployment.mode == "install",
                Deployment.previous_bundle_sha256.is_not(None),
            )
        )
        baseline = _merge(_totals(session, {s for s in old_shas if s}, devices))
    drift: float | None = None
    if gates.max_drift_psi is not None:
        for sha, part in new_parts.items():
            value = max_psi(reference_features(store, sha), part.features)
            if value is not None:
                drift = value if drift is None else max(drift, value)
    gates = replace(gates, max_error_rate=None)  # already judged on the database's sums
    return telemetry_gate_failure(gates, _merge(new_parts), baseline, drift)


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
