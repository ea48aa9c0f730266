"""`edgeota broker config` output against a real Mosquitto: ACL isolation and authentication."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import SecretStr

from edgeota_contract.topics import Channel, device_topic
from ota_server.broker_config import write_broker_config
from ota_server.core.config import Settings
from ota_server.core.security import mosquitto_password_hash

from .conftest import AUTH

pytestmark = pytest.mark.integration


class Peer:
    def __init__(self, port: int, user: str | None, password: str | None, client_id: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.result: Any = None
        self.done = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if user is not None:
            self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.done.wait(5)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.result = rc
        self.done.set()

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.result.is_failure

    def sub(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)

    def pub(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mosquitto_hash_format_is_deterministic_for_a_salt() -> None:
    h = mosquitto_password_hash("secret", salt=b"0" * 12)
    assert h.startswith("$7$101$") and h == mosquitto_password_hash("secret", salt=b"0" * 12)
    assert h != mosquitto_password_hash("other", salt=b"0" * 12)


def test_acl_isolates_devices_and_refuses_bad_logins(
    client: TestClient, settings: Settings, private_mosquitto: Any, tmp_path: Path
) -> None:
    devs = {}
    for dev in ("dev-a", "dev-b"):
        devs[dev] = client.post(
            "/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH
        ).json()
    server_settings = settings.model_copy(
        update={"mqtt_username": "edgeota-server", "mqtt_password": SecretStr("srv-pass-123")}
    )
    passwd, acl, _conf = write_broker_config(server_settings, tmp_path / "broker")
    assert passwd.read_text().count("\n") == 3 and "pattern read edgeota/v1/devices/%u/cmd" in acl.read_text()
    # The files are 0600 and owned by the test user: keep Mosquitto from dropping to its own user.
    broker = private_mosquitto(["user root", "allow_anonymous false", f"password_file {passwd}", f"acl_file {acl}"])
    peers: list[Peer] = []
    try:
        anon = Peer(broker.port, None, None, "anon")
        wrong = Peer(broker.port, "dev-a", "wrong-password", "dev-a")
        peers += [anon, wrong]
        assert not anon.ok and not wrong.ok
        server = Peer(broker.port, "edgeota-server", "srv-pass-123", "srv")
        a = Peer(broker.port, "dev-a", devs["dev-a"]["mqtt_password"], "dev-a")
        b = Peer(broker.port, "dev-b", devs["dev-b"]["mqtt_password"], "dev-b")
        peers += [server, a, b]
        assert server.ok and a.ok and b.ok
        server.sub("edgeota/v1/devices/+/status")
        a.sub(device_topic("dev-b", Channel.CMD))  # denied filters are accepted in 3.1.1 but deliver nothing
        a.sub("#")
        b.sub(device_topic("dev-b", Channel.CMD))
        a.pub(device_topic("dev-b", Channel.STATUS), b"forged by a")
        a.pub(device_topic("dev-a", Channel.STATUS), b"own status")
        server.pub(device_topic("dev-b", Channel.CMD), b"command for b")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (server.received and b.received):
            time.sleep(0.05)
        time.sleep(0.3)
        assert server.received == [(device_topic("dev-a", Channel.STATUS), b"own status")]
        assert b.received == [(device_topic("dev-b", Channel.CMD), b"command for b")]
        assert a.received == []
    finally:
        for peer in peers:
            peer.close()
