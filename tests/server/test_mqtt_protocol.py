"""The bridge speaks MQTT 5 where the broker offers it and falls back to 3.1.1 (amqtt) on ``auto``."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from edgeota.broker import start_broker
from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.main import build_context
from ota_server.mqtt_bridge import MqttBridge
from tests.conftest import Broker

pytestmark = pytest.mark.integration


def _ctx(tmp_path: Path, port: int, protocol: str) -> ServerContext:
    settings = Settings(
        data_dir=tmp_path / "d",
        mqtt_port=port,
        mqtt_protocol=protocol,  # type: ignore[arg-type]
        mqtt_client_id=f"proto-{uuid.uuid4().hex[:8]}",
        engine_enabled=False,
    )
    return build_context(settings)


def test_auto_uses_mqtt5_on_mosquitto(tmp_path: Path, mqtt_broker: Broker) -> None:
    bridge = MqttBridge(_ctx(tmp_path, mqtt_broker.port, "auto"))
    try:
        assert bridge.start(timeout=5) and bridge.protocol == "5"
    finally:
        bridge.stop()


def test_auto_falls_back_to_311_on_amqtt(tmp_path: Path) -> None:
    with start_broker("amqtt", data_dir=tmp_path / "amqtt") as broker:
        forced = MqttBridge(_ctx(tmp_path, broker.port, "5"))
        try:
            assert not forced.start(timeout=2)  # amqtt never answers an MQTT 5 CONNECT
        finally:
            forced.stop()
        bridge = MqttBridge(_ctx(tmp_path, broker.port, "auto"))
        try:
            assert bridge.start(timeout=4) and bridge.protocol == "3.1.1"
            assert bridge.publish_command("some-device", b"{}")
        finally:
            bridge.stop()


def test_bridge_connects_when_the_broker_comes_up_later(tmp_path: Path, private_mosquitto: Any) -> None:
    from tests.conftest import free_port

    port = free_port()
    bridge = MqttBridge(_ctx(tmp_path, port, "auto"))
    try:
        assert not bridge.start(timeout=1)  # nothing listening yet
        private_mosquitto_at(private_mosquitto, port)
        assert bridge.connected.wait(15)
    finally:
        bridge.stop()


def private_mosquitto_at(start: Any, port: int) -> None:
    """Start a private Mosquitto on a chosen port (the fixture picks its own, so add a second listener)."""
    start([f"listener {port} 127.0.0.1", "allow_anonymous true"])
