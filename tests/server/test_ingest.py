"""Device messages: dedupe, acks after commit, re-sends on check-in, reconciliation, bad input."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from edgeota_contract.messages import Presence, TelemetryWindow
from edgeota_contract.states import DeploymentState
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.models import Deployment, Device, TelemetryRecord

from .conftest import AUTH, BundleFactory, upload
from .helpers import BOOT, acked, assignments, checkin, deliver, finish, next_seq, report


def _one_device_rollout(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, dev: str = "dev1") -> str:
    client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    resp = client.post(
        "/api/v1/rollouts", json={"release_id": rel, "selector": {"device_ids": [dev]}, "start": True}, headers=AUTH
    )
    tick(ctx)
    return str(resp.json()["rollout_id"])


def test_status_reports_are_acked_deduplicated_and_ordered(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _one_device_rollout(client, ctx, make_bundle)
    a = assignments(ctx, "dev1")[0]
    outcome, msg = report(ctx, a, DeploymentState.INSTALLING)
    assert outcome == "ok" and msg.msg_id in acked(ctx, "dev1")
    again, _ = report(ctx, a, DeploymentState.INSTALLING, msg_id=msg.msg_id)
    assert again == "duplicate"
    late, late_msg = report(ctx, a, DeploymentState.DOWNLOADING)  # out of order: stored in history, not applied
    assert late == "stale" and late_msg.msg_id in acked(ctx, "dev1")
    with ctx.sessions() as session:
        dep = session.get(Deployment, a.deployment_id)
        assert dep is not None and dep.state == "installing"


def test_bad_messages_are_counted_and_ingest_keeps_running(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _one_device_rollout(client, ctx, make_bundle)
    a = assignments(ctx, "dev1")[0]
    status_topic = device_topic("dev1", Channel.STATUS)
    assert deliver(ctx, status_topic, b"{not json") == "malformed"
    assert deliver(ctx, status_topic, b"\0" * (300 * 1024)) == "malformed"
    assert deliver(ctx, "edgeota/v1/devices/dev1/unknown", b"{}") == "malformed"
    assert deliver(ctx, "other/topic", b"{}") == "malformed"
    assert deliver(ctx, device_topic("dev1", Channel.CHECKIN), b'{"kind":"status"}') == "malformed"
    ghost = deliver(ctx, device_topic("ghost", Channel.PRESENCE), b'{"online":true,"boot_id":"b"}')
    assert ghost == "unknown_device"
    fake = a.model_copy(update={"deployment_id": "nosuchdeployment"})
    assert report(ctx, fake, DeploymentState.COMMITTED)[0] == "unknown_deployment"
    # A device reporting on another device's deployment (identity comes from the topic).
    client.post("/api/v1/devices", json={"device_id": "dev2", "hardware_profile": "x86"}, headers=AUTH)
    assert report(ctx, a, DeploymentState.COMMITTED, device_id="dev2")[0] == "unknown_deployment"
    counts = ctx.metrics.snapshot()
    assert counts["ingest_malformed"] == 5 and counts["ingest_unknown_device"] == 1
    assert counts["ingest_unknown_deployment"] == 2
    assert report(ctx, a, DeploymentState.COMMITTED)[0] == "ok"  # still ingesting
    assert client.get("/api/v1/metrics", headers=AUTH).json()["ingest_malformed"] == 5


def test_checkin_resends_open_deployment_with_fresh_assignment(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _one_device_rollout(client, ctx, make_bundle)
    first = assignments(ctx, "dev1")[0]
    assert checkin(ctx, "dev1", "x86") == "ok"
    second = assignments(ctx, "dev1")[-1]
    assert second.deployment_id == first.deployment_id and second.assignment_id != first.assignment_id
    assert second.nonce != first.nonce
    finish(ctx, second)
    checkin(ctx, "dev1", "x86", models=[second])
    assert len(assignments(ctx, "dev1")) == 2  # finished: not sent again
    with ctx.sessions() as session:
        device = session.get(Device, "dev1")
        assert device is not None and device.presence_online and device.agent_version == "t"


def test_checkin_reconciles_a_device_that_rolled_back_by_itself(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    client.post("/api/v1/devices", json={"device_id": "dev1", "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    for rel in (old, new):
        client.post("/api/v1/rollouts", json={"release_id": rel, "start": True}, headers=AUTH)
        tick(ctx)
        finish(ctx, assignments(ctx, "dev1")[-1])
        tick(ctx)
    v1, v2 = assignments(ctx, "dev1")
    # Later the device's health window fails and it goes back to 1.0.0 without telling the server.
    checkin(ctx, "dev1", "x86", models=[v1])
    detail = client.get("/api/v1/devices/dev1", headers=AUTH).json()
    assert detail["models"][0]["version"] == "1.0.0" and detail["models"][0]["previous_version"] == "1.1.0"
    assert detail["deployments"][0]["state"] == "rolled_back"
    dry = client.post("/api/v1/rollouts", json={"release_id": new, "dry_run": True}, headers=AUTH).json()
    assert dry["skipped_rolled_back_before"] == ["dev1"] and dry["eligible"] == 0
    assert v2.version == "1.1.0"


def test_telemetry_is_stored_once_per_device_boot_seq(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    _one_device_rollout(client, ctx, make_bundle)
    a = assignments(ctx, "dev1")[0]
    window = TelemetryWindow(
        boot_id=BOOT,
        seq=7,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=a.bundle_sha256,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        request_count=10,
        error_count=1,
        latency_counts=[0] * (len(LATENCY_EDGES_MS) + 1),
    )
    topic = device_topic("dev1", Channel.TELEMETRY)
    outcomes = [deliver(ctx, topic, window.model_dump_json().encode()) for _ in range(3)]
    assert outcomes == ["ok", "duplicate", "duplicate"]
    copy = window.model_copy(update={"msg_id": "another-msg-id"})  # same (boot, seq) under a new msg id
    assert deliver(ctx, topic, copy.model_dump_json().encode()) == "duplicate"
    assert {window.msg_id, "another-msg-id"} <= acked(ctx, "dev1")
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TelemetryRecord)) == 1


def test_presence_sets_online(client: TestClient, ctx: ServerContext) -> None:
    client.post("/api/v1/devices", json={"device_id": "p1", "hardware_profile": "x86"}, headers=AUTH)
    topic = device_topic("p1", Channel.PRESENCE)
    deliver(ctx, topic, Presence(online=True, boot_id="b1").model_dump_json().encode())
    assert client.get("/api/v1/devices/p1", headers=AUTH).json()["online"] is True
    deliver(ctx, topic, Presence(online=False, boot_id="b1").model_dump_json().encode())
    assert client.get("/api/v1/devices/p1", headers=AUTH).json()["online"] is False


def test_a_flooding_device_is_throttled_and_others_are_not(client: TestClient, ctx: ServerContext) -> None:
    from ota_server.context import RateLimiter

    ctx.limiter = RateLimiter(rate=0.001, burst=5)
    for dev in ("noisy", "quiet"):
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    noisy = [deliver(ctx, device_topic("noisy", Channel.PRESENCE), b'{"online":true,"boot_id":"b"}') for _ in range(8)]
    assert noisy.count("ok") == 5 and noisy.count("rate_limited") == 3
    assert deliver(ctx, device_topic("quiet", Channel.PRESENCE), b'{"online":true,"boot_id":"b"}') == "ok"
    assert ctx.metrics.snapshot()["ingest_rate_limited"] == 3
    bucket = RateLimiter(rate=10, burst=1)
    assert bucket.allow("d", 0.0) and not bucket.allow("d", 0.05) and bucket.allow("d", 0.2)


def test_a_late_checkin_does_not_undo_a_newer_commit(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """Check-ins are re-sent until acked: under ingest lag one built before an update arrives after its commit.

    Seen at 1,000 simulated devices: the stale "still runs 1.0.0" marked committed canaries rolled back, so the
    failed gate's revert skipped them and 22 devices kept the bad release the server thought they had left.
    """
    client.post("/api/v1/devices", json={"device_id": "dev1", "hardware_profile": "x86"}, headers=AUTH)
    old = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    new = upload(client, make_bundle("1.1.0", "x86")).json()["release_id"]
    client.post("/api/v1/rollouts", json={"release_id": old, "start": True}, headers=AUTH)
    tick(ctx)
    finish(ctx, assignments(ctx, "dev1")[-1])
    tick(ctx)
    v1 = assignments(ctx, "dev1")[0]
    built_before_update = next_seq()  # the device's heartbeat check-in, sent before the new assignment came
    earlier = datetime.now(UTC)
    client.post("/api/v1/rollouts", json={"release_id": new, "start": True}, headers=AUTH)
    tick(ctx)
    v2 = assignments(ctx, "dev1")[-1]
    finish(ctx, v2)
    assert checkin(ctx, "dev1", "x86", models=[v1], seq=built_before_update) == "stale"
    detail = client.get("/api/v1/devices/dev1", headers=AUTH).json()
    assert detail["models"][0]["version"] == "1.1.0"
    assert {d["version"]: d["state"] for d in detail["deployments"]} == {"1.0.0": "committed", "1.1.0": "committed"}
    # A check-in of an earlier boot, delivered late, is older too (by the device's clock).
    assert checkin(ctx, "dev1", "x86", models=[v1], seq=10**6, boot_id="0ldb00t", sent_at=earlier) == "stale"
    assert client.get("/api/v1/devices/dev1", headers=AUTH).json()["models"][0]["version"] == "1.1.0"
    # A newer check-in that shows 1.0.0 still means the device went back by itself.
    assert checkin(ctx, "dev1", "x86", models=[v1]) == "ok"
    detail = client.get("/api/v1/devices/dev1", headers=AUTH).json()
    assert detail["models"][0]["version"] == "1.0.0"
    assert {d["version"]: d["state"] for d in detail["deployments"]}["1.1.0"] == "rolled_back"
