"""Client-id spoofing against the generated Mosquitto configuration, with a real broker and real clients.

A device with valid credentials that connects under another device's client id must not take over
(and so disconnect) that device's session: the victim stays connected and keeps receiving its commands.
"""

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

from .conftest import AUTH

pytestmark = pytest.mark.integration


class Client:
    """A paho client recording its connection results, disconnections and messages."""

    def __init__(self, port: int, user: str, password: str, client_id: str) -> None:
        self.connects: list[Any] = []
        self.disconnects = 0
        self.received: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=False
        )
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.reconnect_delay_set(30, 30)  # a kicked client stays out for the rest of the test
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connects.append(rc)
        self.connected.set()

    def _on_disconnect(self, *_a: Any) -> None:
        self.disconnects += 1

    def sub(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_naming_another_devices_client_id_does_not_take_over_its_session(
    client: TestClient, settings: Settings, private_mosquitto: Any, tmp_path: Path
) -> None:
    creds = {
        dev: client.post("/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"}, headers=AUTH).json()[
            "mqtt_password"
        ]
        for dev in ("victim", "mallory")
    }
    server_settings = settings.model_copy(update={"mqtt_username": "edgeota-server", "mqtt_password": SecretStr("pw")})
    _passwd, _acl, conf = write_broker_config(server_settings, tmp_path / "broker")
    # The generated files are 0600 and owned by the test user: keep Mosquitto from dropping to its own user.
    broker = private_mosquitto(["user root", *conf.read_text().splitlines()])
    clients: list[Client] = []
    try:
        victim = Client(broker.port, "victim", creds["victim"], "victim")
        clients.append(victim)
        assert not victim.connects[0].is_failure
        victim.sub(device_topic("victim", Channel.CMD))
        server = Client(broker.port, "edgeota-server", "pw", "srv")
        clients.append(server)
        mallory = Client(broker.port, "mallory", creds["mallory"], "victim")  # valid credentials, spoofed id
        clients.append(mallory)
        time.sleep(0.5)  # a takeover disconnects the victim at once
        server.client.publish(device_topic("victim", Channel.CMD), b"command for the victim", qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not victim.received and time.monotonic() < deadline:
            time.sleep(0.05)
        assert victim.disconnects == 0, "the spoofing client took over the victim's session"
        assert victim.client.is_connected()
        assert victim.received == [(device_topic("victim", Channel.CMD), b"command for the victim")]
        assert mallory.received == []
    finally:
        for c in clients:
            c.close()
