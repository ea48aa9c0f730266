"""Fleet telemetry review: telemetry merged per release x hardware profile, with drift verdicts.

Two sources, the same merge (:class:`~ota_server.rollout.telemetry_gates.TelemetryTotals`):

- the **aggregates** (:mod:`ota_server.services.telemetry_aggregates`, a few rows per bundle, cohort and
  time bucket) when the filters fit them: no ``until``, ``since`` on a bucket boundary, and a ``cohort``
  selector that names only the configured cohort label;
- the stored **windows** otherwise (exact for any time and any label selector, and slower).

``source`` in the answer says which. Drift per group is :func:`ota_server.drift.evaluate_drift` against
the bundle's ``reference_stats.json`` (the same rule as the rollout gate): input features as one family
and the outputs' class and confidence histograms as another (``output_drift``), each histogram with its
level (stable / watch / drift, or insufficient below the minimum number of values), adjusted p-value,
PSI, Jensen-Shannon distance and number of values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.telemetry import LATENCY_EDGES_MS
from ota_server.artifacts import ArtifactStore
from ota_server.drift import (
    DriftKey,
    DriftReport,
    class_key,
    confidence_key,
    evaluate_drift,
    psi,
    reference_inputs,
    reference_outputs,
)
from ota_server.errors import InvalidRequest
from ota_server.models import Bundle, Device, TelemetryAggregate, TelemetryDevice, TelemetryRecord
from ota_server.rollout.telemetry_gates import TelemetryTotals
from ota_server.services.telemetry import coverage_json, observed_inputs, reference_stats, same_bins
from ota_server.services.telemetry_aggregates import AggregationConfig, read_aggregates

QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
GroupKey = tuple[str, str, str]


@dataclass
class _Group:
    totals: TelemetryTotals = field(default_factory=TelemetryTotals)
    bundles: set[str] = field(default_factory=set)
    devices: set[str] = field(default_factory=set)
    device_count: int | None = None


def _quantile_json(value: float | None) -> float | str | None:
    """JSON has no infinity: a quantile past the last latency edge reads ``">5000.0"``."""
    if value is not None and math.isinf(value):
        return f">{LATENCY_EDGES_MS[-1]}"
    return value


def _labels_match(labels: dict[str, Any], selector: dict[str, str]) -> bool:
    return all(k in labels and str(labels[k]) == v for k, v in selector.items())


def _utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (naive ones are read as UTC). Raises InvalidRequest when it cannot be expressed in UTC."""
    if value is None:
        return None
    try:
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidRequest(f"time {value.isoformat()} out of range") from exc


def _observed_outputs(t: TelemetryTotals) -> dict[DriftKey, list[int]]:
    out = {class_key(name): counts for name, counts in t.outputs.items()}
    out.update({confidence_key(name): counts for name, counts in t.confidence.items()})
    return out


def _feature_json(
    report: DriftReport, reference: dict[DriftKey, list[int]], observed: dict[DriftKey, list[int]]
) -> list[dict[str, Any]]:
    rows = []
    for f in report.features:
        key = f.key
        assert isinstance(key, DriftKey)
        level = f.level
        value = f.psi
        if value is None and sum(observed.get(key) or []) > 0:
            value = psi(reference[key], observed[key])  # the effect size, even below the minimum for a verdict
        rows.append(
            {
                "input": key.name,
                "feature": key.index,
                "psi": value,
                "label": level,
                "level": level,
                "p_value": f.p_value,
                "p_adjusted": f.p_adjusted,
                "js_distance": f.js_distance,
                "n": f.n,
                "values": f.n,
                "note": f.note,
            }
        )
    return rows


def _drift_json(
    store: ArtifactStore, reference_sha: str | None, t: TelemetryTotals
) -> tuple[dict[str, Any], dict[str, Any]]:
    stats = reference_stats(store, reference_sha) if reference_sha else None
    if stats is None or not stats.features:
        empty: dict[str, Any] = {
            "reference": False,
            "max_psi": None,
            "label": None,
            "level": None,
            "summary": "",
            "features": [],
        }
        return empty, {"reference": False, "level": None, "summary": "", "outputs": []}
    reference = reference_inputs(stats)
    observed = same_bins(reference, observed_inputs(t))
    report = evaluate_drift(reference, observed)
    features = _feature_json(report, reference, observed)
    psis = [f["psi"] for f in features if f["psi"] is not None]
    level = None if report.level == "insufficient" and not report.features else report.level
    drift = {
        "reference": True,
        "max_psi": max(psis) if psis else None,
        "label": level,
        "level": level,
        "summary": report.summary(),
        "min_values": report.config.min_values,
        "features": features,
    }
    out_ref = reference_outputs(stats)
    outputs: dict[str, Any] = {"reference": bool(out_ref), "level": None, "summary": "", "outputs": []}
    if out_ref:
        out_report = evaluate_drift(out_ref, same_bins(out_ref, _observed_outputs(t)))
        outputs = {
            "reference": True,
            "level": out_report.level,
            "summary": out_report.summary(),
            "outputs": [f.as_json() for f in out_report.features],
        }
    return drift, outputs


def _group_json(
    store: ArtifactStore, key: GroupKey, group: _Group, profile_bundles: dict[GroupKey, str], worst: int
) -> dict[str, Any]:
    model_name, version, profile = key
    t = group.totals
    drift, output_drift = _drift_json(store, profile_bundles.get(key), t)
    drift["features"] = drift["features"][:worst]
    outputs = {
        name: {"class_counts": counts, "class_share": [c / sum(counts) if sum(counts) else 0.0 for c in counts]}
        for name, counts in sorted(t.outputs.items())
    }
    shadow = [
        {
            "candidate_version": cand_version,
            "candidate_bundle_sha256": cand_sha,
            "compared": compared,
            "top1_agree": agree,
            "agreement": agree / compared if compared else None,
        }
        for (cand_version, cand_sha), (compared, agree) in sorted(t.shadows.items())
    ]
    return {
        "model_name": model_name,
        "version": version,
        "hardware_profile": profile,
        "bundle_sha256": sorted(group.bundles),
        "devices": group.device_count if group.device_count is not None else len(group.devices),
        "windows": t.windows,
        "requests": t.requests,
        "errors": t.errors,
        "error_rate": t.errors / t.requests if t.requests else None,
        "latency_ms": {name: _quantile_json(t.latency_quantile_ms(q)) for name, q in QUANTILES.items()},
        "latency_counts": t.latency_counts,
        "drift": drift,
        "output_drift": output_drift,
        "outputs": outputs,
        "shadow": shadow,
        "spool_dropped": t.spool_dropped,
        "attribution": coverage_json(t.requests, t.attributed_requests),
    }


def _fits_aggregates(
    since: datetime | None, until: datetime | None, cohort: dict[str, str] | None, config: AggregationConfig
) -> bool:
    if until is not None:
        return False
    if since is not None and (since.microsecond or int(since.timestamp()) % config.bucket_seconds):
        return False
    return not cohort or (bool(config.cohort_label) and set(cohort) == {config.cohort_label})


def _from_aggregates(
    session: Session,
    model_name: str | None,
    version: str | None,
    profile: str | None,
    since: datetime | None,
    cohort: dict[str, str] | None,
    config: AggregationConfig,
) -> dict[GroupKey, _Group]:
    agg = TelemetryAggregate
    where: list[Any] = []
    if model_name:
        where.append(agg.model_name == model_name)
    if version:
        where.append(agg.version == version)
    if profile:
        where.append(agg.hardware_profile == profile)
    if since is not None:
        where.append(agg.bucket_start >= since)
    if cohort:
        where.append(agg.cohort == cohort[config.cohort_label])
    groups: dict[GroupKey, _Group] = {}
    for row, totals in read_aggregates(session, *where):
        group = groups.setdefault((row.model_name, row.version, row.hardware_profile), _Group())
        group.totals.merge(totals)
        group.bundles.add(row.bundle_sha256)
    for group in groups.values():
        group.device_count = _device_count(
            session, group.bundles, since, cohort[config.cohort_label] if cohort else None
        )
    return groups


def _device_count(session: Session, shas: set[str], since: datetime | None, cohort: str | None) -> int:
    """Devices that sent windows of ``shas`` ending at or after ``since`` (``telemetry_devices``: one row per
    device and bundle, so this never reads the window rows)."""
    stmt = select(func.count(func.distinct(TelemetryDevice.device_id))).where(TelemetryDevice.bundle_sha256.in_(shas))
    if since is not None:
        stmt = stmt.where(TelemetryDevice.last_window_end >= since)
    if cohort is not None:
        stmt = stmt.where(TelemetryDevice.cohort == cohort)
    return int(session.scalar(stmt) or 0)


def _from_windows(
    session: Session,
    model_name: str | None,
    version: str | None,
    profile: str | None,
    since: datetime | None,
    until: datetime | None,
    cohort: dict[str, str] | None,
) -> dict[GroupKey, _Group]:
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
    profiles = (
        {
            sha: p
            for sha, p in session.execute(select(Bundle.sha256, Bundle.hardware_profile).where(Bundle.sha256.in_(shas)))
        }
        if shas
        else {}
    )
    groups: dict[GroupKey, _Group] = {}
    for record, device_profile, labels in rows:
        if cohort and not _labels_match(labels or {}, cohort):
            continue
        bundle_profile = profiles.get(record.bundle_sha256)
        window_profile = bundle_profile if bundle_profile is not None else device_profile
        if profile and window_profile != profile:
            continue
        group = groups.setdefault((record.model_name, record.version, window_profile), _Group())
        group.totals.add_window(record.payload, record.device_id, bundle_profile is not None)
        group.bundles.add(record.bundle_sha256)
        group.devices.add(record.device_id)
    return groups


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
    config: AggregationConfig | None = None,
) -> dict[str, Any]:
    """Telemetry matching the filters, one group per (model, version, hardware profile).

    A window counts when ``since <= window_end <= until``; ``cohort`` keeps devices whose labels
    contain every ``key=value``. Each group lists request/error counts, latency quantiles (bucket
    upper edges of ``LATENCY_EDGES_MS``), input drift per feature (the ``worst`` features, worst
    first) and output drift against the bundle's reference stats, output class counts, shadow
    agreement per candidate, ``spool_dropped`` and ``attribution`` (requests whose release is known).
    The answer's ``attribution`` sums every group; ``source`` says whether aggregates or windows were read.

    Raises:
        InvalidRequest: ``since`` is after ``until``, or either is out of range.
    """
    config = config or AggregationConfig()
    since, until = _utc(since), _utc(until)
    if since is not None and until is not None and since > until:
        raise InvalidRequest("since must not be after until")
    if _fits_aggregates(since, until, cohort, config):
        source = "aggregates"
        groups = _from_aggregates(session, model_name, version, profile, since, cohort, config)
    else:
        source = "windows"
        groups = _from_windows(session, model_name, version, profile, since, until, cohort)
    shas = {sha for g in groups.values() for sha in g.bundles}
    profile_bundles: dict[GroupKey, str] = {}
    if shas:
        for b in session.scalars(select(Bundle).where(Bundle.sha256.in_(shas))):
            profile_bundles[(b.model_name, b.version, b.hardware_profile)] = b.sha256
    out = [_group_json(store, key, groups[key], profile_bundles, worst) for key in sorted(groups)]
    requests = sum(g["requests"] for g in out)
    attributed = sum(g["attribution"]["attributed_requests"] for g in out)
    return {
        "filters": {
            "model_name": model_name,
            "version": version,
            "profile": profile,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "cohort": cohort or None,
        },
        "source": source,
        "attribution": coverage_json(requests, attributed),
        "groups": out,
    }
