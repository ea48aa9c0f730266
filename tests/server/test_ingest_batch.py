"""Batched ingest on SQLite and PostgreSQL: savepoints, dedupe, order, ack-after-commit, bounded queues."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from edgeota_contract.messages import Ack, Assignment, StatusReport, TelemetryWindow
from edgeota_contract.states import DeploymentState
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.engine import tick
from ota_server.ingest_queue import Incoming, IngestQueue, IngestWriters, apply_batch, writer_sessions
from ota_server.models import Deployment, DeviceMessage, DeviceModel, StatusEvent, TelemetryRecord
from ota_server.services import ingest, ingest_prefetch

from .conftest import AUTH, BundleFactory, upload
from .helpers import BOOT, acked, assignments, commands, status_report


def fleet(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, n: int) -> dict[str, Assignment]:
    """``n`` registered devices, each with a notified deployment of one release; their assignments."""
    devices = [f"dev{i}" for i in range(n)]
    for dev in devices:
        client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH)
    rel = upload(client, make_bundle("1.0.0", "x86")).json()["release_id"]
    body = {"release_id": rel, "selector": {"device_ids": devices}, "start": True}
    assert client.post("/api/v1/rollouts", json=body, headers=AUTH).status_code == 201
    tick(ctx)
    return {dev: assignments(ctx, dev)[0] for dev in devices}


def status(a: Assignment, state: DeploymentState, msg_id: str | None = None) -> Incoming:
    msg = status_report(a, state, msg_id=msg_id)
    return Incoming(
        device_topic(a.device_id, Channel.STATUS), a.device_id, Channel.STATUS, msg.model_dump_json().encode()
    )


def window(device_id: str, seq: int, sha: str = "b" * 64, msg_id: str | None = None) -> Incoming:
    msg = TelemetryWindow(
        boot_id=BOOT,
        seq=seq,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=sha,
        window_start=datetime(2026, 1, 1, tzinfo=UTC),
        window_end=datetime(2026, 1, 1, 0, 1, tzinfo=UTC),
        request_count=10,
        error_count=0,
        latency_counts=[1] * (len(LATENCY_EDGES_MS) + 1),
        **({"msg_id": msg_id} if msg_id else {}),
    )
    topic = device_topic(device_id, Channel.TELEMETRY)
    return Incoming(topic, device_id, Channel.TELEMETRY, msg.model_dump_json().encode())


def msg_id(item: Incoming) -> str:
    return str(ingest_json(item)["msg_id"])


def ingest_json(item: Incoming) -> dict[str, Any]:
    import json

    loaded: dict[str, Any] = json.loads(item.payload)
    return loaded


def count(ctx: ServerContext, model: Any) -> int:
    with ctx.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def acks(ctx: ServerContext, device_id: str) -> list[Ack]:
    return [c for c in commands(ctx, device_id) if isinstance(c, Ack)]


def test_a_bad_message_in_a_batch_loses_nothing_else(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = fleet(client, ctx, make_bundle, 2)
    sessions, engine = writer_sessions(ctx)
    good = status(a["dev0"], DeploymentState.DOWNLOADING)
    poison = status(a["dev1"], DeploymentState.DOWNLOADING)
    real_handle_status = ingest.handle_status

    def fail_after_writing(session: Any, device_id: str, report: StatusReport, known: Any = None) -> Any:
        result = real_handle_status(session, device_id, report, known)
        if report.msg_id == msg_id(poison):
            session.flush()  # its rows reach the database inside the savepoint, then it fails
            raise RuntimeError("handler bug")
        return result

    monkeypatch.setattr(ingest, "handle_status", fail_after_writing)
    ghost = Incoming(device_topic("ghost", Channel.STATUS), "ghost", Channel.STATUS, poison.payload)
    bad_json = Incoming(good.topic, "dev0", Channel.STATUS, b"{not json")
    batch = [good, poison, bad_json, ghost, window("dev1", 1)]
    try:
        outcomes = apply_batch(ctx, sessions, batch)
    finally:
        if engine is not None:
            engine.dispose()
    assert outcomes == ["ok", "error", "malformed", "unknown_device", "ok"]
    with ctx.sessions() as session:
        assert session.get(DeviceMessage, f"dev1/{msg_id(poison)}") is None  # the savepoint undid its rows
        assert session.get(DeviceMessage, f"dev0/{msg_id(good)}") is not None
        dep0 = session.get(Deployment, a["dev0"].deployment_id)
        dep1 = session.get(Deployment, a["dev1"].deployment_id)
        assert dep0 is not None and dep0.state == "downloading"
        assert dep1 is not None and dep1.state == "notified"
    assert count(ctx, TelemetryRecord) == 1 and count(ctx, StatusEvent) == 1
    assert acked(ctx, "dev0") == {msg_id(good)} and acked(ctx, "dev1") == {msg_id(batch[4])}
    m = ctx.metrics.snapshot()
    assert (m["ingest_ok"], m["ingest_error"], m["ingest_malformed"], m["ingest_unknown_device"]) == (2, 1, 1, 1)
    assert m["ingest_batch_redone"] == 1 and "ingest_batch_failed" not in m


def test_a_conflicting_insert_is_undone_alone_and_acked(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy stored by another server process after the batch looked (IntegrityError): the rest commits."""
    fleet(client, ctx, make_bundle, 1)
    sessions, engine = writer_sessions(ctx)
    first = window("dev0", 5)
    try:
        assert apply_batch(ctx, sessions, [first]) == ["ok"]
        # Hide the stored copy from the batch's look-up, as if another process inserted it concurrently.
        monkeypatch.setattr(ingest_prefetch, "prefetch", lambda _s, _b, **_k: ingest_prefetch.Known())
        copy = window("dev0", 5, msg_id="copy-of-five")
        outcomes = apply_batch(ctx, sessions, [window("dev0", 4), copy, window("dev0", 6)])
    finally:
        if engine is not None:
            engine.dispose()
    assert outcomes == ["ok", "duplicate", "ok"]
    with ctx.sessions() as session:
        assert sorted(session.scalars(select(TelemetryRecord.seq))) == [4, 5, 6]
    assert "copy-of-five" in acked(ctx, "dev0")
    m = ctx.metrics.snapshot()  # the fast pass hit the conflict at commit; the careful pass committed
    assert m["ingest_batch_redone"] == 1 and "ingest_batch_failed" not in m


def test_duplicates_within_and_across_batches_are_stored_once(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    a = fleet(client, ctx, make_bundle, 1)["dev0"]
    sessions, engine = writer_sessions(ctx)
    s1 = status(a, DeploymentState.DOWNLOADING)
    w1 = window("dev0", 1)
    w1_new_id = window("dev0", 1, msg_id="same-window-new-id")
    try:
        first = apply_batch(ctx, sessions, [s1, w1, s1, w1, w1_new_id])
        second = apply_batch(ctx, sessions, [w1, s1, window("dev0", 2)])
    finally:
        if engine is not None:
            engine.dispose()
    assert first == ["ok", "ok", "duplicate", "duplicate", "duplicate"]
    assert second == ["duplicate", "duplicate", "ok"]
    assert count(ctx, TelemetryRecord) == 2 and count(ctx, StatusEvent) == 1 and count(ctx, DeviceMessage) == 1
    # One ack per device per batch, naming every message of that batch (duplicates too: they are stored).
    batch_acks = acks(ctx, "dev0")
    assert len(batch_acks) == 2
    assert batch_acks[0].msg_ids == [msg_id(s1), msg_id(w1), msg_id(s1), msg_id(w1), "same-window-new-id"]


def test_nothing_is_acked_when_the_commit_fails_and_redelivery_stores_once(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    a = fleet(client, ctx, make_bundle, 2)
    sessions, own_engine = writer_sessions(ctx)
    engine = own_engine or ctx.engine
    batch = [
        status(a["dev0"], DeploymentState.DOWNLOADING),
        window("dev0", 1),
        status(a["dev1"], DeploymentState.DOWNLOADING),
    ]
    sent_before = len(ctx.publisher.sent)  # type: ignore[attr-defined]

    def fail_commit(_conn: Any) -> None:
        raise OSError("disk gone at commit")

    event.listen(engine, "commit", fail_commit)
    try:
        assert apply_batch(ctx, sessions, batch) == ["error"] * 3
        event.remove(engine, "commit", fail_commit)
        assert len(ctx.publisher.sent) == sent_before  # type: ignore[attr-defined]
        assert count(ctx, DeviceMessage) == 0 and count(ctx, TelemetryRecord) == 0
        m = ctx.metrics.snapshot()  # the fast pass, then two careful passes, then given up unacked
        assert m["ingest_batch_redone"] == 1 and m["ingest_batch_failed"] == 2
        assert apply_batch(ctx, sessions, batch) == ["ok"] * 3  # the devices re-send
        assert apply_batch(ctx, sessions, batch) == ["duplicate"] * 3
    finally:
        if event.contains(engine, "commit", fail_commit):
            event.remove(engine, "commit", fail_commit)
        if own_engine is not None:
            own_engine.dispose()
    assert count(ctx, DeviceMessage) == 2 and count(ctx, TelemetryRecord) == 1 and count(ctx, StatusEvent) == 2
    assert acked(ctx, "dev0") == {msg_id(batch[0]), msg_id(batch[1])}


def test_writers_keep_each_devices_order(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
    """Several writers on PostgreSQL (one on SQLite), small batches: every device's reports apply in order."""
    ctx.settings = ctx.settings.model_copy(update={"ingest_workers": 3, "ingest_batch_max": 7})
    a = fleet(client, ctx, make_bundle, 9)
    steps = (DeploymentState.DOWNLOADING, DeploymentState.INSTALLING, DeploymentState.TRIAL, DeploymentState.COMMITTED)
    writers = IngestWriters(ctx)
    expected = 3 if ctx.settings.resolved_database_url.startswith("postgresql") else 1
    assert len(writers.queues) == expected
    sent: dict[str, list[str]] = {dev: [] for dev in a}
    for i, state in enumerate(steps):  # interleaved across devices, like a fleet's reports
        for dev, assignment in a.items():
            item = status(assignment, state)
            sent[dev].append(state.value)
            assert writers.submit(item.topic, item.payload)
            assert writers.submit(*_topic_payload(window(dev, i)))
    writers.start()
    assert writers.stop(drain_seconds=60) == 0
    with ctx.sessions() as session:
        for dev, assignment in a.items():
            events = session.scalars(
                select(StatusEvent.state).where(StatusEvent.device_id == dev).order_by(StatusEvent.id)
            )
            assert list(events) == sent[dev]
            dep = session.get(Deployment, assignment.deployment_id)
            assert dep is not None and dep.state == "committed"
    assert count(ctx, TelemetryRecord) == 4 * len(a)
    assert ctx.metrics.snapshot()["ingest_ok"] == 8 * len(a)


def _topic_payload(item: Incoming) -> tuple[str, bytes]:
    return item.topic, item.payload


def test_a_stopped_writer_abandons_its_queue_unacked(client: TestClient, ctx: ServerContext) -> None:
    client.post("/api/v1/devices", json={"device_id": "dev0", "hardware_profile": "x86"}, headers=AUTH)
    writers = IngestWriters(ctx)
    for seq in range(5):
        assert writers.submit(*_topic_payload(window("dev0", seq)))
    assert not writers.submit("not/a/device/topic", b"{}")
    assert not writers.submit(device_topic("dev0", Channel.CMD), b"{}")  # the server's own commands
    assert writers.stop(drain_seconds=0) == 5  # never started: nothing applied
    assert not writers.submit(*_topic_payload(window("dev0", 9)))  # after stop: not queued
    assert count(ctx, TelemetryRecord) == 0 and acked(ctx, "dev0") == set()
    m = ctx.metrics.snapshot()
    assert m["ingest_abandoned"] == 6 and m["ingest_malformed"] == 1 and m["ingest_ignored_cmd"] == 1


def test_a_flooding_device_is_throttled_in_a_batch_and_not_acked(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    from ota_server.context import RateLimiter

    fleet(client, ctx, make_bundle, 2)
    ctx.limiter = RateLimiter(rate=0.001, burst=2)
    sessions, engine = writer_sessions(ctx)
    batch = [window("dev0", seq) for seq in range(4)] + [window("dev1", 0)]
    try:
        outcomes = apply_batch(ctx, sessions, batch)
    finally:
        if engine is not None:
            engine.dispose()
    assert outcomes == ["ok", "ok", "rate_limited", "rate_limited", "ok"]
    assert acked(ctx, "dev0") == {msg_id(batch[0]), msg_id(batch[1])}  # the device re-sends the other two
    assert count(ctx, TelemetryRecord) == 3 and ctx.metrics.snapshot()["ingest_rate_limited"] == 2


def test_the_queue_blocks_when_full_instead_of_growing() -> None:
    q = IngestQueue(max_items=3, max_bytes=10_000)
    item = Incoming("t", "d", Channel.STATUS, b"x" * 100)
    for _ in range(3):
        assert q.put(item)
    done = threading.Event()
    results: list[bool] = []

    def producer() -> None:
        results.append(q.put(item))
        done.set()

    thread = threading.Thread(target=producer)
    thread.start()
    assert not done.wait(0.3) and len(q) == 3 and q.blocked_puts == 1
    assert len(q.take(2, 0.1)) == 2
    assert done.wait(5) and results == [True] and len(q) == 2
    thread.join()
    # Bytes bound too; one oversized payload still fits into an empty queue.
    q2 = IngestQueue(max_items=100, max_bytes=250)
    assert q2.put(Incoming("t", "d", Channel.STATUS, b"x" * 1000))
    late = threading.Thread(target=lambda: results.append(q2.put(item)))
    late.start()
    late.join(0.3)
    assert late.is_alive() and len(q2) == 1
    q2.close()  # a closing writer releases the blocked network thread without queueing
    late.join(5)
    assert not late.is_alive() and results[-1] is False and len(q2) == 1
    assert q2.take(10, 0.0)[0].payload == b"x" * 1000 and q2.take(10, 0.0) == []


def test_generated_broker_config_raises_the_per_client_queue_limits(
    settings: Any, client: TestClient, tmp_path: Any
) -> None:
    from ota_server.broker_config import BROKER_LIMITS, write_broker_config

    # (``client``: the server created its database, which broker config reads)

    _passwd, _acl, conf = write_broker_config(settings, tmp_path / "broker")
    lines = conf.read_text().splitlines()
    assert "max_queued_messages 200000" in lines and "max_inflight_messages 1000" in lines
    assert f"message_size_limit {BROKER_LIMITS['message_size_limit']}" in lines


def checkin_item(a: Assignment, runs: bool, seq: int | None = None, active: str | None = None) -> Incoming:
    """A check-in of ``a``'s device, running ``a``'s bundle when ``runs`` (nothing otherwise)."""
    from .helpers import checkin_message

    msg = checkin_message("x86", [a] if runs else [], active=active, seq=seq, boot_id=BOOT)
    return Incoming(
        device_topic(a.device_id, Channel.CHECKIN), a.device_id, Channel.CHECKIN, msg.model_dump_json().encode()
    )


def test_a_batch_of_heartbeats_costs_a_fixed_number_of_queries(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """Check-ins find their model rows and deployments in the batch's look-ups, not two queries each."""
    a = fleet(client, ctx, make_bundle, 12)
    sessions, own_engine = writer_sessions(ctx)
    engine = own_engine or ctx.engine
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    try:
        for dep in a.values():  # every device commits its release: a deployment and a model row each
            for state in (DeploymentState.DOWNLOADING, DeploymentState.TRIAL, DeploymentState.COMMITTED):
                assert apply_batch(ctx, sessions, [status(dep, state)]) == ["ok"]
        batch = [checkin_item(dep, runs=True) for dep in a.values()]
        event.listen(engine, "before_cursor_execute", seen)
        assert apply_batch(ctx, sessions, batch) == ["ok"] * 12
    finally:
        if event.contains(engine, "before_cursor_execute", seen):
            event.remove(engine, "before_cursor_execute", seen)
        if own_engine is not None:
            own_engine.dispose()
    selects = [re.findall(r"\bFROM\s+(\w+)", s)[0] for s in statements if s.lstrip().upper().startswith("SELECT")]
    # One look-up each of devices, their model rows and their deployments for all 12 (24 more before).
    assert sorted(selects) == ["deployments", "device_models", "devices"], selects
    with ctx.sessions() as session:
        rows = session.scalars(select(DeviceModel)).all()
        assert len(rows) == 12 and {r.bundle_sha256 for r in rows} == {a["dev0"].bundle_sha256}
        assert {d.state for d in session.scalars(select(Deployment))} == {DeploymentState.COMMITTED.value}


def test_check_ins_and_reports_of_one_device_in_one_batch_see_each_others_rows(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """A model row added by an earlier message of the batch is updated, not inserted twice; a check-in that
    shows the release running, after the device's commit in the same batch, leaves it committed."""
    a = fleet(client, ctx, make_bundle, 2)
    sessions, engine = writer_sessions(ctx)
    dev0, dev1 = a["dev0"], a["dev1"]
    try:
        outcomes = apply_batch(
            ctx,
            sessions,
            [
                status(dev0, DeploymentState.DOWNLOADING),
                status(dev0, DeploymentState.TRIAL),
                status(dev0, DeploymentState.COMMITTED),  # adds dev0's model row
                checkin_item(dev0, runs=True),  # finds that row in the batch
                checkin_item(dev1, runs=False),  # dev1 runs nothing yet: its open deployment is re-sent
                checkin_item(dev1, runs=False),
            ],
        )
    finally:
        if engine is not None:
            engine.dispose()
    assert outcomes == ["ok"] * 6
    with ctx.sessions() as session:
        rows = session.scalars(select(DeviceModel)).all()
        assert [(r.device_id, r.bundle_sha256) for r in rows] == [("dev0", dev0.bundle_sha256)]
        states = {d.device_id: d.state for d in session.scalars(select(Deployment))}
    assert states == {"dev0": DeploymentState.COMMITTED.value, "dev1": DeploymentState.NOTIFIED.value}
    assert len(assignments(ctx, "dev1")) == 3  # the rollout's, then one fresh assignment per check-in


def test_a_batch_size_of_zero_from_an_old_config_means_one_through_the_writers(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """``ingest_batch_max = 0`` once chose a per-message path; it is gone, so 0 is read as batches of one."""
    ctx.settings = ctx.settings.model_copy(update={"ingest_batch_max": 0})
    a = fleet(client, ctx, make_bundle, 1)["dev0"]
    writers = IngestWriters(ctx)
    assert writers.batch_max == 1
    items = [status(a, DeploymentState.DOWNLOADING), status(a, DeploymentState.COMMITTED)]
    for item in items:
        assert writers.submit(item.topic, item.payload)
    writers.start()
    assert writers.stop(drain_seconds=60) == 0
    assert ctx.metrics.snapshot()["ingest_batches"] == 2 and acked(ctx, "dev0") == {msg_id(i) for i in items}
    with ctx.sessions() as session:
        dep = session.get(Deployment, a.deployment_id)
        assert dep is not None and dep.state == DeploymentState.COMMITTED.value
