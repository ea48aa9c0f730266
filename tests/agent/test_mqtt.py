"""The agent over a real Mosquitto: signed assignments in, full status sequence out, acks, refusals."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.settings import AgentConfig
from device_agent.transport.mqtt import MqttLink
from edgeota_contract.messages import Ack, CheckinRequest, StatusReport, sign_command
from edgeota_contract.signing import SigningKey
from tests.agent.bundles import sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.agent.mqtt_helpers import Recorder, StoppableMosquitto
from tests.conftest import Broker

pytestmark = pytest.mark.integration
HAPPY = ["downloading", "downloaded", "verifying", "installing", "trial", "committed"]


@pytest.fixture
def device_id() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def online(
    tmp_path: Path, keys: Keys, server: BundleServer, mqtt_broker: Broker, device_id: str
) -> Iterator[tuple[Agent, Recorder]]:
    recorder = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    config = write_config(tmp_path, keys, server.url, device_id=device_id, mqtt_port=mqtt_broker.port)
    agent = Agent(AgentConfig.load(config))
    agent.start()
    assert agent.transport is not None and agent.transport.wait_connected(10)
    try:
        yield agent, recorder
    finally:
        agent.stop()
        recorder.close()


def _statuses(rec: Recorder, deployment_id: str) -> list[str]:
    seen: dict[str, str] = {}
    for p in rec.of("status"):
        if p.get("deployment_id") == deployment_id:
            seen.setdefault(p["msg_id"], p["state"])
    return list(seen.values())


def _ack(keys: Keys, device_id: str, msg_ids: list[str]) -> bytes:
    now = datetime.now(UTC)
    return sign_command(
        Ack(device_id=device_id, msg_ids=msg_ids, issued_at=now, expires_at=now + timedelta(minutes=5)), keys.server
    )


def test_install_over_mqtt_reports_full_sequence_until_acked(
    online: tuple[Agent, Recorder], keys: Keys, publish_bundle: Callable[..., BundleRef], device_id: str
) -> None:
    agent, rec = online
    assert isinstance(agent.transport, MqttLink) and agent.transport.protocol_in_use == "5"
    assert rec.wait_for(lambda: any(p.get("online") for p in rec.of("presence")))
    assert rec.wait_for(lambda: rec.of("checkin"))
    rec.publish_cmd(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
    assert rec.wait_for(lambda: _statuses(rec, "dep-1") == HAPPY), _statuses(rec, "dep-1")
    reports = [StatusReport.model_validate(p) for p in rec.of("status")]
    assert all(r.boot_id == agent.boot_id for r in reports)
    # not acked yet: re-sent on the retry tick with the same msg_id
    first_ids = {r.msg_id for r in reports}
    assert rec.wait_for(lambda: len(rec.of("status")) > len(reports))
    assert {p["msg_id"] for p in rec.of("status")} == first_ids
    rec.publish_cmd(_ack(keys, device_id, sorted(first_ids)))
    assert rec.wait_for(lambda: agent.state.outbox == [])
    # the server asks for a check-in: it names what really runs
    now = datetime.now(UTC)
    count = len(rec.of("checkin"))
    rec.publish_cmd(
        sign_command(
            CheckinRequest(device_id=device_id, issued_at=now, expires_at=now + timedelta(minutes=1)), keys.server
        )
    )
    assert rec.wait_for(lambda: len(rec.of("checkin")) > count)
    models = rec.of("checkin")[-1]["models"]
    assert [(m["version"], m["state"]) for m in models] == [("1.0.0", "serving")]


def test_unsigned_and_foreign_commands_ignored(
    online: tuple[Agent, Recorder],
    keys: Keys,
    publish_bundle: Callable[..., BundleRef],
    device_id: str,
    server: BundleServer,
) -> None:
    agent, rec = online
    bundle = publish_bundle("1.0.0")
    rec.publish_cmd(signed(assignment(bundle, device_id=device_id, deployment_id="dep-evil"), SigningKey.generate()))
    rec.publish_cmd(signed(assignment(bundle, device_id="someone-else"), keys.server))
    rec.publish_cmd(b"garbage")
    assert rec.wait_for(lambda: agent.rejected_commands == 3)
    assert server.requests == []
    assert agent.state.active_slot is None
    # the forged one names a deployment for this device: reported, with its reason
    assert rec.wait_for(lambda: [p["reason"] for p in rec.of("status")] == ["unknown_key"])


def test_unacked_reports_survive_restart(
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    mqtt_broker: Broker,
    device_id: str,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    config = write_config(tmp_path, keys, server.url, device_id=device_id, mqtt_port=mqtt_broker.port)
    with Agent(AgentConfig.load(config), connect=False) as offline:
        offline.handle_command(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
        assert offline.wait_idle(30)
        kept = [r["msg_id"] for r in offline.state.outbox]
    assert len(kept) == len(HAPPY)
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    try:
        with Agent(AgentConfig.load(config)) as agent:
            assert rec.wait_for(lambda: {p["msg_id"] for p in rec.of("status")} == set(kept))
            assert _statuses(rec, "dep-1") == HAPPY
            rec.publish_cmd(_ack(keys, device_id, kept))
            assert rec.wait_for(lambda: agent.state.outbox == [])
    finally:
        rec.close()


def test_telemetry_spooled_while_broker_down_then_delivered(
    tmp_path: Path, keys: Keys, server: BundleServer, device_id: str, publish_bundle: Callable[..., BundleRef]
) -> None:
    broker = StoppableMosquitto(tmp_path)
    broker.start()
    rec: Recorder | None = None
    config = write_config(
        tmp_path,
        keys,
        server.url,
        device_id=device_id,
        mqtt_port=broker.port,
        telemetry_window_seconds=0.3,
        report_retry_seconds=0.3,
    )
    agent = Agent(AgentConfig.load(config))
    try:
        agent.start()
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
        assert agent.wait_idle(30)
        assert agent.transport is not None and agent.transport.wait_connected(10)
        broker.stop()
        assert rec_wait(lambda: agent.transport is not None and not agent.transport.connected)
        for _ in range(4):  # four windows of traffic while offline
            for _ in range(5):
                agent.predict({"x": sample_inputs()})
            time.sleep(0.4)
        spool = agent.outbox.spool
        assert spool is not None and len(spool) >= 3
        offline = [json.loads(p) for _, p in spool.oldest(100)]
        keyset = {(w["boot_id"], w["seq"]) for w in offline}
        broker.start()
        rec = Recorder("127.0.0.1", broker.port, device_id)
        assert agent.transport.wait_connected(30)
        r = rec
        assert r.wait_for(lambda: keyset <= {(w["boot_id"], w["seq"]) for w in r.of("telemetry")}, 30)
        delivered = [w for w in r.of("telemetry") if (w["boot_id"], w["seq"]) in keyset]
        firsts: dict[tuple[str, int], dict[str, object]] = {}
        for w in delivered:
            firsts.setdefault((w["boot_id"], w["seq"]), w)
        assert [k[1] for k in firsts] == sorted(k[1] for k in firsts)  # drained in order
        for w in delivered:  # duplicates on the wire carry the same identity and content
            assert w == firsts[(w["boot_id"], w["seq"])]
        assert sum(w["request_count"] for w in firsts.values()) == 20
        for w in offline:
            assert w["version"] == "1.0.0" and w["model_name"] == "digits"
        r.publish_cmd(_ack(keys, device_id, [w["msg_id"] for w in offline]))
        assert r.wait_for(
            lambda: all(m not in {x for x, _ in spool.oldest(1000)} for m in (w["msg_id"] for w in offline))
        )
    finally:
        agent.stop()
        if rec is not None:
            rec.close()
        broker.stop()


def rec_wait(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_falls_back_to_311_on_amqtt(
    tmp_path: Path, keys: Keys, server: BundleServer, device_id: str, publish_bundle: Callable[..., BundleRef]
) -> None:
    from edgeota.broker import start_broker

    with start_broker("amqtt", data_dir=tmp_path / "amqtt") as broker:
        config = write_config(
            tmp_path, keys, server.url, device_id=device_id, mqtt_port=broker.port, mqtt_connect_probe_seconds=1.0
        )
        rec = Recorder(broker.host, broker.port, device_id)
        try:
            with Agent(AgentConfig.load(config)) as agent:
                assert isinstance(agent.transport, MqttLink) and agent.transport.wait_connected(30)
                assert agent.transport.protocol_in_use == "3.1.1"
                rec.publish_cmd(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
                assert rec.wait_for(lambda: _statuses(rec, "dep-1") == HAPPY), _statuses(rec, "dep-1")
        finally:
            rec.close()


def test_heartbeat_checkins(
    tmp_path: Path, keys: Keys, server: BundleServer, mqtt_broker: Broker, device_id: str
) -> None:
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    config = write_config(
        tmp_path, keys, server.url, device_id=device_id, mqtt_port=mqtt_broker.port, heartbeat_seconds=0.3
    )
    try:
        with Agent(AgentConfig.load(config)) as agent:
            # a fresh check-in each beat (the unacked latest one is also re-sent: same msg_id, same seq)
            assert rec.wait_for(lambda: len({c["msg_id"] for c in rec.of("checkin")}) >= 4, 15)
            checkins = rec.of("checkin")
            assert all(c["boot_id"] == agent.boot_id and c["models"] == [] for c in checkins)
            seq_of = {c["msg_id"]: c["seq"] for c in checkins}
            assert all(seq_of[c["msg_id"]] == c["seq"] for c in checkins)
            firsts = list(dict.fromkeys(c["msg_id"] for c in checkins))
            assert [seq_of[m] for m in firsts] == sorted(seq_of[m] for m in firsts)
    finally:
        rec.close()
