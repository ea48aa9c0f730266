"""Telemetry aggregates equal the sum of the stored windows, whatever arrives twice (both databases).

Windows go through the production ingest path (:func:`ota_server.ingest_queue.apply_batch`): single
messages, batches with duplicates inside, and re-deliveries in later batches. The aggregates are then
compared with the window rows merged again in Python, key by key, and the migration's back-fill is
checked to build the same rows from the windows.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from alembic import command
from fastapi.testclient import TestClient
from sqlalchemy import select

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS, FeatureSummary, OutputSummary, ShadowSummary
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.db import alembic_config
from ota_server.ingest_queue import apply_batch, receive
from ota_server.models import Device, TelemetryAggregate, TelemetryDevice, TelemetryRecord
from ota_server.rollout.telemetry_gates import TelemetryTotals
from ota_server.services.telemetry_aggregates import AggregationConfig, bucket_start, cohort_of, row_totals

from .conftest import AUTH, BundleFactory, upload
from .helpers import _sessions, deliver

T0 = datetime(2026, 5, 1, 10, 2, tzinfo=UTC)
EDGES = [-1.0, 0.0, 1.0]


def _window(rng: np.random.Generator, sha: str, seq: int, end: datetime, shadow: bool = False) -> TelemetryWindow:
    n = int(rng.integers(50, 300))
    errors = int(rng.integers(0, 5))
    return TelemetryWindow(
        boot_id="boot-a",
        seq=seq,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=sha,
        window_start=end - timedelta(minutes=1),
        window_end=end,
        request_count=n,
        error_count=errors,
        latency_counts=[
            int(c) for c in rng.multinomial(n, [1 / (len(LATENCY_EDGES_MS) + 1)] * (len(LATENCY_EDGES_MS) + 1))
        ],
        features=[
            FeatureSummary(input="x", feature=j, edges=EDGES, counts=[int(c) for c in rng.integers(0, 40, 4)])
            for j in range(3)
        ],
        outputs=[
            OutputSummary(
                output="y", class_counts=[int(c) for c in rng.integers(0, 30, 3)], nan_count=int(rng.integers(0, 2))
            )
        ],
        shadow=ShadowSummary(
            candidate_version="1.1.0", candidate_bundle_sha256="c" * 64, compared=n, top1_agree=n - errors
        )
        if shadow
        else None,
        spool_dropped=seq % 3,
    )


def _expected(ctx: ServerContext, config: AggregationConfig) -> dict[tuple[object, ...], TelemetryTotals]:
    """Every stored window merged again per aggregate key (the windows are the truth)."""
    out: dict[tuple[object, ...], TelemetryTotals] = {}
    with ctx.sessions() as session:
        devices = {d.id: d for d in session.scalars(select(Device))}
        from ota_server.models import Bundle

        profiles = {b.sha256: b.hardware_profile for b in session.scalars(select(Bundle))}
        for w in session.scalars(select(TelemetryRecord)):
            device = devices[w.device_id]
            shadow = (w.payload.get("shadow") or {}).get("candidate_bundle_sha256", "")
            key = (
                w.bundle_sha256,
                profiles.get(w.bundle_sha256, device.hardware_profile),
                cohort_of(device.labels, config.cohort_label),
                bucket_start(w.window_end, config.bucket_seconds),
                shadow,
            )
            out.setdefault(key, TelemetryTotals()).add_window(w.payload, w.device_id, w.bundle_sha256 in profiles)
    return out


def _stored(ctx: ServerContext) -> dict[tuple[object, ...], TelemetryTotals]:
    with ctx.sessions() as session:
        return {
            (r.bundle_sha256, r.hardware_profile, r.cohort, r.bucket_start, r.shadow_sha256): row_totals(r)
            for r in session.scalars(select(TelemetryAggregate))
        }


def _devices(ctx: ServerContext) -> dict[tuple[str, str], tuple[str, datetime]]:
    with ctx.sessions() as session:
        return {
            (r.device_id, r.bundle_sha256): (r.cohort, r.last_window_end)
            for r in session.scalars(select(TelemetryDevice))
        }


def _expected_devices(ctx: ServerContext) -> dict[tuple[str, str], tuple[str, datetime]]:
    """Per device and bundle: its cohort and newest window end, from the window rows."""
    out: dict[tuple[str, str], tuple[str, datetime]] = {}
    with ctx.sessions() as session:
        labels = {d.id: d.labels for d in session.scalars(select(Device))}
        for w in session.scalars(select(TelemetryRecord)):
            key = (w.device_id, w.bundle_sha256)
            end = max(w.window_end, out[key][1]) if key in out else w.window_end
            out[key] = (cohort_of(labels[w.device_id], "cohort"), end)
    return out


def test_aggregates_equal_the_sum_of_the_windows_and_count_each_once(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rng = np.random.default_rng(11)
    sha = upload(client, make_bundle("1.0.0", "x86")).json()["bundle_sha256"]
    fleet = {"a1": {"cohort": "north"}, "a2": {"cohort": "south"}, "a3": {}}
    for device, labels in fleet.items():
        body = {"device_id": device, "hardware_profile": "x86", "labels": labels}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    sent: list[tuple[str, TelemetryWindow]] = []
    for i in range(12):
        device = list(fleet)[i % 3]
        bundle = sha if i % 5 else "f" * 64  # some windows name a bundle this server never stored
        sent.append((device, _window(rng, bundle, i, T0 + timedelta(minutes=2 * i), shadow=i % 4 == 0)))
    for device, w in sent[:4]:  # one message per batch
        assert deliver(ctx, device_topic(device, Channel.TELEMETRY), w.model_dump_json().encode()) == "ok"
    # one batch with every later window three times over, then the whole lot again in a second batch
    items = [receive(ctx, device_topic(d, Channel.TELEMETRY), w.model_dump_json().encode()) for d, w in sent[4:] * 3]
    outcomes = apply_batch(ctx, _sessions(ctx), [i for i in items if i is not None])
    assert outcomes.count("ok") == len(sent) - 4 and outcomes.count("duplicate") == 2 * (len(sent) - 4)
    again = [receive(ctx, device_topic(d, Channel.TELEMETRY), w.model_dump_json().encode()) for d, w in sent]
    assert set(apply_batch(ctx, _sessions(ctx), [i for i in again if i is not None])) == {"duplicate"}

    stored, expected = _stored(ctx), _expected(ctx, AggregationConfig())
    assert stored == expected and len(stored) > 3
    assert {k[2] for k in stored} == {"north", "south", ""}  # cohorts: the label's value, "" without it
    total = TelemetryTotals()
    for part in stored.values():
        total.merge(part)
    assert total.windows == len(sent) and total.requests == sum(w.request_count for _, w in sent)
    unknown = sum(w.request_count for _, w in sent if w.bundle_sha256 == "f" * 64)
    assert total.requests - total.attributed_requests == unknown > 0
    assert total.shadow_compared == sum(w.request_count for _, w in sent if w.shadow)
    assert _devices(ctx) == _expected_devices(ctx) and len(_devices(ctx)) == 6  # 3 devices x 2 bundles


def test_the_migration_backfills_the_same_aggregates(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rng = np.random.default_rng(5)
    sha = upload(client, make_bundle("1.0.0", "x86")).json()["bundle_sha256"]
    for device, cohort in (("b1", "east"), ("b2", "west")):
        body = {"device_id": device, "hardware_profile": "x86", "labels": {"cohort": cohort}}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    for i in range(8):
        w = _window(rng, sha, i, T0 + timedelta(minutes=3 * i), shadow=i % 3 == 0)
        assert deliver(ctx, device_topic(f"b{i % 2 + 1}", Channel.TELEMETRY), w.model_dump_json().encode()) == "ok"
    live, devices = _stored(ctx), _devices(ctx)
    cfg = alembic_config(ctx.engine.url.render_as_string(hide_password=False))
    with ctx.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0005")
    with ctx.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    assert _stored(ctx) == live and len(live) >= 4
    assert _devices(ctx) == devices == _expected_devices(ctx)
