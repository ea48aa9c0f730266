"""The telemetry page's figures: latency and errors over time per release x profile, drift per feature over time,
release against release, accuracy. Read from the telemetry aggregates (a few rows per bundle, cohort and 5-minute
bucket), never from the window rows, and drawn as server-side SVG (CSP-safe: attributes and classes, no styles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.telemetry import LATENCY_EDGES_MS, histogram_quantile
from ota_server.artifacts import ArtifactStore
from ota_server.drift import evaluate_drift, psi, reference_inputs
from ota_server.models import Bundle, Release, TelemetryAggregate, utcnow
from ota_server.rollout.telemetry_gates import TelemetryTotals
from ota_server.services.telemetry import observed_inputs, reference_stats, same_bins
from ota_server.services.telemetry_aggregates import AggregationConfig, bucket_start, read_aggregates

AGG = TelemetryAggregate
SLOTS = 24
"""Columns of the charts and of the drift heat map."""


@dataclass
class Series:
    version: str
    profile: str
    p95: list[float | None] = field(default_factory=list)
    error_rate: list[float | None] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)


def slot_edges(hours: int, config: AggregationConfig, now: datetime | None = None) -> list[datetime]:
    """``SLOTS + 1`` slot boundaries, each slot a whole number of aggregate buckets, the last one holding now.

    Boundaries are multiples of the slot width since the epoch, so they stay put while the newest slot fills (the
    per-slot caches then hold for every closed slot).
    """
    now = now or utcnow()
    width = max(config.bucket_seconds, math.ceil(hours * 3600 / SLOTS / config.bucket_seconds) * config.bucket_seconds)
    end = bucket_start(now, width) + timedelta(seconds=width)
    start = end - timedelta(seconds=width * SLOTS)
    return [start + timedelta(seconds=width * i) for i in range(SLOTS + 1)]


def _slot(edges: list[datetime], when: datetime) -> int | None:
    if when < edges[0] or when >= edges[-1]:
        return None
    width = (edges[1] - edges[0]).total_seconds()
    return min(SLOTS - 1, int((when - edges[0]).total_seconds() // width))


def models(session: Session) -> list[str]:
    """Models with a release (the releases table is small; the aggregates are not)."""
    return list(session.scalars(select(Release.model_name).distinct().order_by(Release.model_name)))


def versions(session: Session, model: str) -> list[str]:
    """The model's releases, oldest first."""
    return list(
        session.scalars(select(Release.version).where(Release.model_name == model).order_by(Release.created_at))
    )


def _by_slot(
    session: Session, where: list[Any], rows: list[tuple[Any, TelemetryTotals]], edges: list[datetime]
) -> list[list[Any]]:
    """``rows`` of :func:`read_aggregates` over ``where`` grouped by slot (their bucket starts are read with the same
    filter: one query of two plain columns, no list of ids sent back)."""
    when = {row_id: at for row_id, at in session.execute(select(AGG.id, AGG.bucket_start).where(*where))}
    out: list[list[Any]] = [[] for _ in range(SLOTS)]
    for row, totals in rows:
        at = when.get(row.id)
        slot = _slot(edges, at) if at is not None else None
        if slot is not None:
            out[slot].append((row, totals))
    return out


SlotSums = dict[tuple[str, str], list[int]]
"""Per (version, profile): [requests, errors, *latency buckets] of one slot."""
_SERIES_CACHE: dict[tuple[Any, ...], tuple[tuple[Any, ...], SlotSums]] = {}
"""Per (database, filters, slot bounds): the slot's signature when summed, and its sums."""


def _signatures(session: Session, where: list[Any], edges: list[datetime]) -> list[tuple[Any, ...]]:
    """Per slot, what changes whenever a row of it changes: (bucket, rows, windows, newest update) per bucket.

    One grouped query over the range (a few hundred rows), so unchanged slots are known without reading their rows.
    """
    per_slot: list[list[tuple[Any, ...]]] = [[] for _ in range(SLOTS)]
    for bucket, n, windows, newest in session.execute(
        select(AGG.bucket_start, func.count(), func.sum(AGG.windows), func.max(AGG.updated_at))
        .where(*where)
        .group_by(AGG.bucket_start)
    ):
        slot = _slot(edges, _aware(bucket))
        if slot is not None:
            per_slot[slot].append((str(bucket), int(n), int(windows or 0), str(newest)))
    return [tuple(sorted(sig)) for sig in per_slot]


def _aware(value: datetime) -> datetime:
    """A timestamp from an aggregate query (SQLite gives naive UTC) as an aware UTC datetime."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def _sum_slots(session: Session, where: list[Any], edges: list[datetime], slots: list[int]) -> list[SlotSums]:
    """Sums of the given slots, read in one query over the range they span (latency buckets only, no histograms)."""
    out: list[SlotSums] = [{} for _ in range(SLOTS)]
    if not slots:
        return out
    width = len(LATENCY_EDGES_MS) + 1
    wanted = set(slots)
    rows = session.execute(
        select(AGG.version, AGG.hardware_profile, AGG.bucket_start, AGG.requests, AGG.errors, AGG.latency_counts).where(
            *where, AGG.bucket_start >= edges[min(slots)], AGG.bucket_start < edges[max(slots) + 1]
        )
    )
    for version, profile, bucket, requests, errors, latency in rows:
        slot = _slot(edges, bucket)
        if slot is None or slot not in wanted:
            continue
        acc = out[slot].setdefault((version, profile), [0] * (2 + width))
        acc[0] += int(requests)
        acc[1] += int(errors)
        if latency and len(latency) == width:
            for k, n in enumerate(latency):
                acc[k + 2] += int(n)
    return out


def latest_with_telemetry(session: Session, model: str, since: datetime) -> str | None:
    """The version of ``model`` whose telemetry arrived last since ``since`` (None without any)."""
    return session.scalar(
        select(AGG.version)
        .where(AGG.model_name == model, AGG.bucket_start >= since)
        .order_by(AGG.bucket_start.desc(), AGG.version.desc())
        .limit(1)
    )


def series(session: Session, model: str, version: str, profile: str, edges: list[datetime]) -> list[Series]:
    """p95 latency and error rate per slot, one series per (version, profile) with telemetry in the range.

    A slot is summed again only when its signature (:func:`_signatures`) changed since it was last summed: in steady
    state that is the newest slot, so a view costs one grouped query and the rows of one slot.
    """
    where = [AGG.model_name == model, AGG.bucket_start >= edges[0]]
    if version:
        where.append(AGG.version == version)
    if profile:
        where.append(AGG.hardware_profile == profile)
    db = str(session.get_bind().engine.url)
    signatures = _signatures(session, where, edges)
    keys = [(db, model, version, profile, edges[j], edges[j + 1]) for j in range(SLOTS)]
    stale = [j for j in range(SLOTS) if signatures[j] and _SERIES_CACHE.get(keys[j], (None,))[0] != signatures[j]]
    fresh = _sum_slots(session, where, edges, stale)
    if len(_SERIES_CACHE) > 50_000:
        _SERIES_CACHE.clear()
    for j in stale:
        _SERIES_CACHE[keys[j]] = (signatures[j], fresh[j])
    sums = [_SERIES_CACHE[keys[j]][1] if signatures[j] and keys[j] in _SERIES_CACHE else {} for j in range(SLOTS)]
    out = []
    for v, p in sorted({key for slot in sums for key in slot}):
        s = Series(v, p)
        for slot in sums:
            acc = slot.get((v, p))
            requests = acc[0] if acc else 0
            q = histogram_quantile(LATENCY_EDGES_MS, acc[2:], 0.95) if acc and requests else None
            s.p95.append(None if q is None or math.isinf(q) else q)
            s.error_rate.append(acc[1] / requests if acc and requests else None)
            s.requests.append(requests)
        out.append(s)
    return out


@dataclass(frozen=True)
class Chart:
    """An SVG line chart: one ``path`` per series (``d`` in the chart's own coordinates), y ticks, x labels."""

    width: int
    height: int
    paths: list[dict[str, Any]]
    y_ticks: list[tuple[float, str]]
    x_labels: list[tuple[float, str]]
    empty: bool


def line_chart(
    values: list[tuple[str, list[float | None]]], edges: list[datetime], fmt: str, width: int = 720, height: int = 220
) -> Chart:
    """Scale every series to the chart; a gap (None) breaks the line."""
    left, right, top, bottom = 56, 10, 10, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    finite = [v for _, vs in values for v in vs if v is not None]
    top_value = max(finite) if finite else 1.0
    top_value = top_value * 1.1 if top_value > 0 else 1.0
    paths = []
    for i, (name, vs) in enumerate(values):
        parts: list[str] = []
        pen_up = True
        for j, v in enumerate(vs):
            if v is None:
                pen_up = True
                continue
            x = left + plot_w * (j + 0.5) / SLOTS
            y = top + plot_h * (1 - v / top_value)
            parts.append(f"{'M' if pen_up else 'L'}{x:.1f},{y:.1f}")
            pen_up = False
        paths.append({"name": name, "d": " ".join(parts), "colour": i % 8})
    ticks = [(top + plot_h * (1 - k / 4), fmt.format(top_value * k / 4)) for k in range(5)]
    labels = [
        (left + plot_w * j / SLOTS, edges[j].strftime("%H:%M" if (edges[-1] - edges[0]).days < 2 else "%m-%d"))
        for j in range(0, SLOTS + 1, 4)
    ]
    return Chart(width, height, paths, ticks, labels, not finite)


LEVELS = ("stable", "watch", "drift", "insufficient")


_SLOT_CACHE: dict[tuple[Any, ...], tuple[tuple[Any, ...], dict[str, dict[str, Any]]]] = {}
"""Per (database, bundle, slot bounds): the slot's signature (:func:`_signatures`) when judged, and its drift cells."""


def _slot_drift(reference: dict[Any, list[int]], parts: list[Any]) -> dict[str, dict[str, Any]]:
    """Per feature, the level, PSI and values of the merged ``parts`` against ``reference``."""
    merged = TelemetryTotals()
    for _, totals in parts:
        merged.merge(totals)
    observed = same_bins(reference, observed_inputs(merged))
    if not merged.windows or not observed:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for f in evaluate_drift(reference, observed).features:
        value = f.psi
        if value is None and sum(observed.get(f.key, []) or []) > 0:  # type: ignore[call-overload]
            value = psi(reference[f.key], observed[f.key])  # type: ignore[index]
        out[str(f.key)] = {"level": f.level, "psi": value, "n": f.n}
    return out


def drift_heatmap(
    session: Session, store: ArtifactStore, model: str, version: str, profile: str, edges: list[datetime]
) -> dict[str, Any]:
    """Per input feature and slot, the drift level and PSI of that slot's values against the bundle's reference.

    Needs one bundle: ``version`` and ``profile`` (when the profile is empty, the profile with the most requests).
    Returns ``{"bundle", "profile", "features": [{"name", "cells": [{"level", "psi", "n"} | None]}], "note"}``.
    """
    if not version:
        return {"features": [], "note": "choose a release (version) to see its drift", "profile": profile}
    if not profile:
        profile = (
            session.scalar(
                select(AGG.hardware_profile)
                .where(AGG.model_name == model, AGG.version == version, AGG.bucket_start >= edges[0])
                .group_by(AGG.hardware_profile)
                .order_by(func.sum(AGG.requests).desc())
                .limit(1)
            )
            or ""
        )
    bundle = session.scalar(
        select(Bundle.sha256).where(
            Bundle.model_name == model, Bundle.version == version, Bundle.hardware_profile == profile
        )
    )
    stats = reference_stats(store, bundle) if bundle else None
    if stats is None or not stats.features:
        return {
            "features": [],
            "note": f"no reference statistics for {model} {version} on {profile or '?'}",
            "profile": profile,
        }
    reference = reference_inputs(stats)
    where = [
        AGG.model_name == model,
        AGG.version == version,
        AGG.hardware_profile == profile,
        AGG.bucket_start >= edges[0],
    ]
    db = str(session.get_bind().engine.url)
    signatures = _signatures(session, where, edges)
    keys = [(db, bundle, edges[j], edges[j + 1]) for j in range(SLOTS)]
    # A slot's verdict depends only on its rows: unchanged slots come from the cache, changed ones are read again.
    stale = [j for j in range(SLOTS) if signatures[j] and _SLOT_CACHE.get(keys[j], (None,))[0] != signatures[j]]
    if stale:
        span = [*where, AGG.bucket_start >= edges[min(stale)], AGG.bucket_start < edges[max(stale) + 1]]
        parts = _by_slot(session, span, read_aggregates(session, *span), edges)
        if len(_SLOT_CACHE) > 20_000:
            _SLOT_CACHE.clear()
        for j in stale:
            _SLOT_CACHE[keys[j]] = (signatures[j], _slot_drift(reference, parts[j]) if parts[j] else {})
    cells: dict[str, list[dict[str, Any] | None]] = {str(k): [None] * SLOTS for k in reference}
    for j in range(SLOTS):
        cached = _SLOT_CACHE.get(keys[j]) if signatures[j] else None
        for key, cell in (cached[1] if cached else {}).items():
            if key in cells:
                cells[key][j] = cell

    def worst_first(name: str) -> tuple[int, float, str]:
        row = [c for c in cells[name] if c]
        return (-sum(1 for c in row if c["level"] == "drift"), -max((c["psi"] or 0.0 for c in row), default=0.0), name)

    # The worst features first: the most slots in drift, then the highest PSI.
    features = [{"name": name, "cells": cells[name]} for name in sorted(cells, key=worst_first)]
    return {
        "features": features[:40],
        "note": "",
        "profile": profile,
        "bundle": bundle,
        "hidden": max(0, len(features) - 40),
    }
