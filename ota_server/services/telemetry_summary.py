"""Fleet telemetry review: stored windows merged per release x hardware profile.

The merge (additive counts), quantiles and PSI are those of the rollout telemetry gates
(:mod:`ota_server.rollout.telemetry_gates`), and the reference histograms come from the stored
bundle's ``reference_stats.json`` (:func:`ota_server.services.telemetry.reference_features`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.telemetry import LATENCY_EDGES_MS
from ota_server.artifacts import ArtifactStore
from ota_server.core.problems import ApiError
from ota_server.models import Bundle, Device, TelemetryRecord
from ota_server.rollout.telemetry_gates import TelemetryTotals, drift_label, feature_psi
from ota_server.services.telemetry import reference_features

QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


@dataclass
class _Group:
    totals: TelemetryTotals = field(default_factory=TelemetryTotals)
    bundles: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    shadow: dict[tuple[str, str], TelemetryTotals] = field(default_factory=dict)


def _quantile_json(value: float | None) -> float | str | None:
    """JSON has no infinity: a quantile past the last latency edge reads ``">5000.0"``."""
    if value is not None and math.isinf(value):
        return f">{LATENCY_EDGES_MS[-1]}"
    return value


def _labels_match(labels: dict[str, Any], selector: dict[str, str]) -> bool:
    return all(k in labels and str(labels[k]) == v for k, v in selector.items())


def _utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (naive ones are read as UTC). Raises ApiError(422) when it cannot be expressed in UTC."""
    if value is None:
        return None
    try:
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise ApiError(422, "Unprocessable Content", f"time {value.isoformat()} out of range") from exc


def _group_json(
    store: ArtifactStore, key: tuple[str, str, str], group: _Group, profile_bundles: dict[tuple[str, str, str], str]
) -> dict[str, Any]:
    model_name, version, profile = key
    t = group.totals
    reference_sha = profile_bundles.get(key)
    reference = reference_features(store, reference_sha) if reference_sha else []
    psis = feature_psi(reference, t.features)
    worst = psis[0][1] if psis else None
    outputs = {
        name: {"class_counts": counts, "class_share": [c / sum(counts) if sum(counts) else 0.0 for c in counts]}
        for name, counts in sorted(t.outputs.items())
    }
    shadow = [
        {
            "candidate_version": cand_version,
            "candidate_bundle_sha256": cand_sha,
            "compared": s.shadow_compared,
            "top1_agree": s.shadow_agree,
            "agreement": s.shadow_agree / s.shadow_compared if s.shadow_compared else None,
        }
        for (cand_version, cand_sha), s in sorted(group.shadow.items())
    ]
    return {
        "model_name": model_name,
        "version": version,
        "hardware_profile": profile,
        "bundle_sha256": sorted(group.bundles),
        "devices": len(group.devices),
        "windows": t.windows,
        "requests": t.requests,
        "errors": t.errors,
        "error_rate": t.errors / t.requests if t.requests else None,
        "latency_ms": {name: _quantile_json(t.latency_quantile_ms(q)) for name, q in QUANTILES.items()},
        "latency_counts": t.latency_counts,
        "drift": {
            "reference": bool(reference),
            "max_psi": worst,
            "label": drift_label(worst) if worst is not None else None,
            # values: how many finite values the PSI rests on (devices may summarise a sample of their requests)
            "features": [
                {"input": k[0], "feature": k[1], "psi": v, "label": drift_label(v), "values": sum(t.features[k])}
                for k, v in psis
            ],
        },
        "outputs": outputs,
        "shadow": shadow,
        "spool_dropped": t.spool_dropped,
    }


def telemetry_summary(
    session: Session,
    store: ArtifactStore,
    model_name: str | None = None,
    version: str | None = None,
    profile: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    cohort: dict[str, str] | None = None,
    worst: int = 10,
) -> dict[str, Any]:
    """Merge the stored windows matching the filters, one group per (model, version, hardware profile).

    A window counts when ``since <= window_end <= until``; ``cohort`` keeps devices whose labels
    contain every ``key=value``. Each group lists request/error counts, latency quantiles (bucket
    upper edges of ``LATENCY_EDGES_MS``), per-feature PSI against the bundle's reference stats (the
    ``worst`` features, worst first, labelled stable/watch/act), output class counts, shadow
    agreement per candidate, and ``spool_dropped``.

    Raises:
        ApiError(422): ``since`` is after ``until``, or either is out of range.
    """
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since > until:
        raise ApiError(422, "Unprocessable Content", "since must not be after until")
    stmt = select(TelemetryRecord, Device.hardware_profile, Device.labels).join(
        Device, Device.id == TelemetryRecord.device_id
    )
    if model_name:
        stmt = stmt.where(TelemetryRecord.model_name == model_name)
    if version:
        stmt = stmt.where(TelemetryRecord.version == version)
    if since is not None:
        stmt = stmt.where(TelemetryRecord.window_end >= since)
    if until is not None:
        stmt = stmt.where(TelemetryRecord.window_end <= until)
    rows = list(session.execute(stmt.order_by(TelemetryRecord.id)))
    shas = {row[0].bundle_sha256 for row in rows}
    bundles = {b.sha256: b for b in session.scalars(select(Bundle).where(Bundle.sha256.in_(shas)))} if shas else {}
    groups: dict[tuple[str, str, str], _Group] = {}
    for record, device_profile, labels in rows:
        if cohort and not _labels_match(labels or {}, cohort):
            continue
        bundle = bundles.get(record.bundle_sha256)
        window_profile = bundle.hardware_profile if bundle is not None else device_profile
        if profile and window_profile != profile:
            continue
        group = groups.setdefault((record.model_name, record.version, window_profile), _Group())
        group.totals.add_window(record.payload, record.device_id)
        group.bundles.add(record.bundle_sha256)
        group.devices.add(record.device_id)
        shadow = record.payload.get("shadow")
        if shadow:
            cand = (str(shadow.get("candidate_version")), str(shadow.get("candidate_bundle_sha256")))
            group.shadow.setdefault(cand, TelemetryTotals()).add_shadow(shadow)
    profile_bundles = {(b.model_name, b.version, b.hardware_profile): sha for sha, b in bundles.items()}
    out = []
    for key in sorted(groups):
        body = _group_json(store, key, groups[key], profile_bundles)
        body["drift"]["features"] = body["drift"]["features"][:worst]
        out.append(body)
    return {
        "filters": {
            "model_name": model_name,
            "version": version,
            "profile": profile,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "cohort": cohort or None,
        },
        "groups": out,
    }
