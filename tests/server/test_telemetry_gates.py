"""Telemetry gates: pure evaluation, and a rollout halted by its devices' telemetry (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient

from edgeota_contract.messages import Assignment, TelemetryWindow
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputSummary,
    ReferenceStats,
)
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.mqtt_bridge import process_message
from ota_server.rollout.plan import Gates
from ota_server.rollout.telemetry_gates import TelemetryTotals, max_psi, telemetry_gate_failure

from .conftest import AUTH, BundleFactory, upload
from .helpers import BOOT, assignments, finish

N = len(LATENCY_EDGES_MS) + 1
_seq = iter(range(10_000, 1_000_000))


def latency(bucket: int, n: int) -> list[int]:
    counts = [0] * N
    counts[bucket] = n
    return counts


def window(
    a: Assignment,
    requests: int,
    errors: int,
    lat_bucket: int = 5,
    features: list[FeatureSummary] | None = None,
    nan_values: int = 0,
) -> TelemetryWindow:
    return TelemetryWindow(
        boot_id=BOOT,
        seq=next(_seq),
        model_name=a.model_name,
        version=a.version,
        bundle_sha256=a.bundle_sha256,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        request_count=requests,
        error_count=errors,
        latency_counts=latency(lat_bucket, requests),
        features=features or [],
        outputs=[OutputSummary(output="y", nan_count=nan_values)] if nan_values else [],
    )


def totals(*windows: TelemetryWindow) -> TelemetryTotals:
    t = TelemetryTotals()
    for w in windows:
        t.add_window(w.model_dump(mode="json"))
    return t


def _a(version: str = "1.0.0") -> Assignment:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Assignment(
        deployment_id="d",
        device_id="x",
        model_name="m",
        version=version,
        release_counter=1,
        hardware_profile="p",
        bundle_sha256="0" * 64,
        bundle_size=1,
        bundle_url="/u",
        issued_at=now,
        expires_at=now,
    )


def test_error_rate_gate_waits_for_enough_requests() -> None:
    gates = Gates(max_error_rate=0.05, min_telemetry_requests=100)
    assert telemetry_gate_failure(gates, totals(window(_a(), 50, 40)), None, None) is None
    failing = totals(window(_a(), 50, 40), window(_a(), 60, 0))
    assert "error rate" in (telemetry_gate_failure(gates, failing, None, None) or "")
    assert telemetry_gate_failure(gates, totals(window(_a(), 200, 5)), None, None) is None


def test_p95_latency_gate_compares_with_previous_release() -> None:
    gates = Gates(max_p95_latency_ratio=1.5, min_telemetry_requests=10)
    old = totals(window(_a(), 100, 0, lat_bucket=5))  # p95 <= 2 ms
    assert "p95 latency" in (telemetry_gate_failure(gates, totals(window(_a(), 100, 0, lat_bucket=8)), old, None) or "")
    assert telemetry_gate_failure(gates, totals(window(_a(), 100, 0, lat_bucket=5)), old, None) is None
    assert telemetry_gate_failure(gates, totals(window(_a(), 100, 0, lat_bucket=8)), None, None) is None


def test_nan_output_gate_counts_values_per_successful_request() -> None:
    gates = Gates(max_nan_output_rate=0.0, min_telemetry_requests=100)
    assert telemetry_gate_failure(gates, totals(window(_a(), 50, 0, nan_values=5)), None, None) is None  # too few
    assert telemetry_gate_failure(gates, totals(window(_a(), 200, 0)), None, None) is None
    failing = totals(window(_a(), 200, 0), window(_a(), 100, 50, nan_values=1))
    assert failing.nan_outputs == 1
    assert "1 non-finite output values in 250 requests" in (telemetry_gate_failure(gates, failing, None, None) or "")
    lenient = Gates(max_nan_output_rate=0.01, min_telemetry_requests=100)
    assert telemetry_gate_failure(lenient, failing, None, None) is None  # 0.004 per request
    assert telemetry_gate_failure(Gates(min_telemetry_requests=1), failing, None, None) is None  # gate off


def test_drift_psi_against_reference() -> None:
    ref = [{"input": "x", "feature": 0, "edges": [0.5], "counts": [50, 50]}]
    same = {("x", 0): [500, 500]}
    shifted = {("x", 0): [990, 10]}
    assert (max_psi(ref, same) or 0) < 0.01
    assert (max_psi(ref, shifted) or 0) > 0.25
    gates = Gates(max_drift_psi=0.25, min_telemetry_requests=1)
    assert "drift" in (telemetry_gate_failure(gates, totals(window(_a(), 10, 0)), None, max_psi(ref, shifted)) or "")


def _send(ctx: ServerContext, device_id: str, w: TelemetryWindow) -> None:
    assert process_message(ctx, device_topic(device_id, Channel.TELEMETRY), w.model_dump_json().encode()) == "ok"


def test_rollout_halts_on_error_rate_and_drift(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    ref = ReferenceStats(
        sample_count=100, features=[FeatureReference(input="x", feature=0, edges=[0.5], counts=[50, 50])]
    )
    client.post("/api/v1/devices", json={"device_id": "t1", "hardware_profile": "x86"}, headers=AUTH)
    releases = [
        upload(client, make_bundle(v, "x86", reference=ref.model_dump_json().encode())).json()["release_id"]
        for v in ("1.0.0", "1.1.0")
    ]
    releases.append(upload(client, make_bundle("1.2.0", "x86")).json()["release_id"])
    gates = [
        {"max_error_rate": 0.1, "min_telemetry_requests": 50},
        {"max_drift_psi": 0.25, "min_telemetry_requests": 50},
        {"max_nan_output_rate": 0, "min_telemetry_requests": 50},
    ]
    for release, gate in zip(releases, gates, strict=True):
        body = {
            "release_id": release,
            "stages": [{"percent": 100, "soak_seconds": 3600}],
            "start": True,
            "on_failure": "pause",
            "gates": gate,
        }
        rid = client.post("/api/v1/rollouts", json=body, headers=AUTH).json()["rollout_id"]
        tick(ctx)
        a = assignments(ctx, "t1")[-1]
        finish(ctx, a)
        tick(ctx)
        assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"  # soaking
        if "max_error_rate" in gate:
            _send(ctx, "t1", window(a, 100, 2))
            tick(ctx)
            assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
            _send(ctx, "t1", window(a, 100, 40))
            expected = "error rate"
        elif "max_nan_output_rate" in gate:
            _send(ctx, "t1", window(a, 100, 0))
            tick(ctx)
            assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
            # a model that returns NaN on a share of live inputs passes the device's short trial: the fleet sees it
            _send(ctx, "t1", window(a, 100, 0, nan_values=30))
            expected = "non-finite output"
        else:
            drifted = FeatureSummary(input="x", feature=0, edges=[0.5], counts=[95, 5])
            _send(ctx, "t1", window(a, 100, 0, features=[drifted]))
            expected = "drift"
        tick(ctx)
        status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
        assert status["state"] == "paused" and status["reason"] == "gate_failed" and expected in status["detail"]
        client.post(f"/api/v1/rollouts/{rid}/abort", headers=AUTH)


def test_shadow_agreement_gate() -> None:
    from ota_server.rollout.telemetry_gates import shadow_gate_failure

    gates = Gates(min_shadow_agreement=0.9, min_telemetry_requests=100)
    low = TelemetryTotals()
    low.add_shadow({"compared": 50, "top1_agree": 10})
    assert shadow_gate_failure(gates, low) is None  # too few comparisons yet
    low.add_shadow({"compared": 100, "top1_agree": 100})
    assert "shadow agreement" in (shadow_gate_failure(gates, low) or "")
    good = TelemetryTotals()
    good.add_shadow({"compared": 200, "top1_agree": 190})
    assert shadow_gate_failure(gates, good) is None
    assert shadow_gate_failure(Gates(), low) is None


def test_rollout_halts_on_p95_latency_against_what_the_devices_ran_before(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """The latency gate reads the histograms (the sums alone come from SQL) of old and new bundles."""
    client.post("/api/v1/devices", json={"device_id": "t1", "hardware_profile": "x86"}, headers=AUTH)
    old, new = (upload(client, make_bundle(v, "x86")).json()["release_id"] for v in ("1.0.0", "1.1.0"))
    body: dict[str, object] = {"release_id": old, "stages": [{"percent": 100}], "start": True}
    client.post("/api/v1/rollouts", json=body, headers=AUTH)
    tick(ctx)
    before = assignments(ctx, "t1")[-1]
    finish(ctx, before)
    _send(ctx, "t1", window(before, 200, 0, lat_bucket=3))  # the old release: fast
    gate = {"max_p95_latency_ratio": 1.5, "min_telemetry_requests": 50}
    body = {**body, "release_id": new, "stages": [{"percent": 100, "soak_seconds": 3600}], "gates": gate}
    body["on_failure"] = "pause"
    rid = client.post("/api/v1/rollouts", json=body, headers=AUTH).json()["rollout_id"]
    tick(ctx)
    after = assignments(ctx, "t1")[-1]
    assert after.version == "1.1.0"
    finish(ctx, after)
    _send(ctx, "t1", window(after, 40, 0, lat_bucket=9))  # slow, but fewer than min_telemetry_requests
    tick(ctx)
    assert client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()["state"] == "running"
    _send(ctx, "t1", window(after, 40, 0, lat_bucket=9))
    tick(ctx)
    status = client.get(f"/api/v1/rollouts/{rid}", headers=AUTH).json()
    assert status["state"] == "paused" and "p95 latency" in status["detail"], status["detail"]
