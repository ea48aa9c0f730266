"""``GET /metrics``: the Prometheus exposition, parsed with prometheus_client's own parser (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.engine import tick

from .conftest import AUTH, BundleFactory, make_token, upload
from .helpers import assignments, deliver, finish


def scrape(
    client: TestClient, headers: dict[str, str] | None = None
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Samples by name, then by their sorted labels."""
    resp = client.get("/metrics", headers=headers if headers is not None else AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_need_a_viewer_token(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer nope.nope"}).status_code == 401
    created = client.post("/api/v1/devices", json={"device_id": "m-9", "hardware_profile": "x86"}, headers=AUTH)
    device = {"Authorization": f"Bearer {created.json()['token']}"}
    assert client.get("/metrics", headers=device).status_code == 403
    assert "edgeota_alerts_total" in scrape(client, make_token(client, "viewer"))
    assert client.get("/api/v1/metrics", headers=AUTH).status_code == 200  # the JSON counters stay


def test_metrics_public_flag_serves_without_a_token(client: TestClient, ctx: ServerContext) -> None:
    ctx.settings.metrics_public = True
    try:
        assert scrape(client, headers={})["edgeota_alerts_total"] == {(): 0.0}
    finally:
        ctx.settings.metrics_public = False


def test_metrics_report_fleet_telemetry_rollouts_and_gates(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    body = {"device_id": "m-1", "hardware_profile": "x86", "labels": {"cohort": "north"}}
    assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    release = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    plan = {
        "release_id": release,
        "stages": [{"percent": 100, "soak_seconds": 3600}],
        "start": True,
        "gates": {"max_error_rate": 0.5, "min_telemetry_requests": 100},
    }
    assert client.post("/api/v1/rollouts", json=plan, headers=AUTH).status_code == 201
    tick(ctx)
    a = assignments(ctx, "m-1")[-1]
    finish(ctx, a)
    window = TelemetryWindow(
        boot_id="b",
        seq=1,
        model_name=a.model_name,
        version=a.version,
        bundle_sha256=a.bundle_sha256,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        request_count=40,
        error_count=2,
        latency_counts=[40] + [0] * len(LATENCY_EDGES_MS),
    )
    assert deliver(ctx, device_topic("m-1", Channel.TELEMETRY), window.model_dump_json().encode()) == "ok"
    tick(ctx)  # 40 of 100 requests: the gate is not evaluated yet
    m = scrape(client)
    key = (("cohort", "north"), ("model", "digits"), ("profile", "x86"), ("version", "1.0.0"))
    assert m["edgeota_telemetry_windows_total"][key] == 1
    assert m["edgeota_telemetry_requests_total"][key] == 40
    assert m["edgeota_telemetry_errors_total"][key] == 2
    assert m["edgeota_telemetry_attributed_requests_total"][key] == 40
    assert m["edgeota_telemetry_attribution_coverage"][()] == 1.0
    assert m["edgeota_rollouts"][(("state", "running"),)] == 1 and m["edgeota_rollouts"][(("state", "completed"),)] == 0
    assert m["edgeota_devices"][key] == 1  # what m-1 runs now
    assert m["edgeota_devices_registered"][(("cohort", "north"), ("profile", "x86"))] == 1
    gates = m["edgeota_gate_evaluations_total"]
    assert gates[(("gate", "error_rate"), ("result", "not_evaluated"))] >= 1
    assert (("gate", "error_rate"), ("result", "passed")) not in gates
    assert m["edgeota_ingest_messages_total"][(("outcome", "ok"),)] >= 5  # status reports and the window
    assert m["edgeota_ingest_queue_depth"][()] == 0
    assert m["edgeota_alerts_total"][()] == 0
    assert not any("device" in name for labels in m.values() for label in labels for name, _ in label)


def test_queue_depth_follows_the_ingest_writers(client: TestClient, ctx: ServerContext) -> None:
    """Queued messages show as depth until a writer takes them (the gauge lives in the core's counters)."""
    import time

    from ota_server.ingest_queue import IngestWriters

    assert client.post("/api/v1/devices", json={"device_id": "q-1", "hardware_profile": "x86"}, headers=AUTH)
    writers = IngestWriters(ctx)
    for seq in range(3):
        window = TelemetryWindow(
            boot_id="q",
            seq=seq,
            model_name="digits",
            version="1.0.0",
            bundle_sha256="d" * 64,
            window_start=datetime(2026, 1, 1, tzinfo=UTC),
            window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
            request_count=1,
            error_count=0,
            latency_counts=[1] + [0] * len(LATENCY_EDGES_MS),
        )
        assert writers.submit(device_topic("q-1", Channel.TELEMETRY), window.model_dump_json().encode())
    assert scrape(client)["edgeota_ingest_queue_depth"][()] == 3
    writers.start()
    try:
        deadline = time.monotonic() + 30
        while writers.queued() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        writers.stop()
    m = scrape(client)
    assert m["edgeota_ingest_queue_depth"][()] == 0
    assert (
        m["edgeota_telemetry_windows_total"][
            (("cohort", ""), ("model", "digits"), ("profile", "x86"), ("version", "1.0.0"))
        ]
        == 3
    )
