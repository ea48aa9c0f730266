"""Batched ingest through a real Mosquitto (configured with the generated limits) and the real bridge."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from edgeota_contract.messages import Ack, verify_command
from edgeota_contract.signing import TrustedKeys
from edgeota_contract.states import DeploymentState
from edgeota_contract.topics import Channel, device_topic
from ota_server.broker_config import render_limits
from ota_server.context import ServerContext
from ota_server.models import Deployment, StatusEvent, TelemetryRecord
from ota_server.mqtt_bridge import MqttBridge

from .conftest import BundleFactory
from .test_ingest_batch import count, fleet, msg_id, status, window

pytestmark = pytest.mark.integration


class Device:
    """A device's MQTT side: publishes reports in order, collects the server's verified acks."""

    def __init__(self, port: int, device_id: str, keys: TrustedKeys) -> None:
        self.device_id = device_id
        self.keys = keys
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(device_topic(device_id, Channel.CMD), qos=1)
        assert self.subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        command = verify_command(bytes(msg.payload), self.keys, self.device_id)
        if isinstance(command, Ack):
            with self.lock:
                self.acked.update(command.msg_ids)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_burst_through_mosquitto_is_stored_once_in_order_and_acked(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, private_mosquitto: Any
) -> None:
    """Tiny writer queues force back-pressure onto paho's network thread: nothing is dropped."""
    broker = private_mosquitto(["allow_anonymous true", *render_limits().splitlines()])
    a = fleet(client, ctx, make_bundle, 4)
    ctx.settings = ctx.settings.model_copy(
        update={
            "mqtt_enabled": True,
            "mqtt_port": broker.port,
            "mqtt_client_id": f"srv-{uuid.uuid4().hex[:8]}",
            "ingest_queue_max": 2,
            "ingest_batch_max": 5,
        }
    )
    bridge = MqttBridge(ctx)
    ctx.publisher = bridge
    keys = TrustedKeys([ctx.server_key.public_key])
    devices: list[Device] = []
    try:
        assert bridge.start(timeout=10)
        devices = [Device(broker.port, dev, keys) for dev in a]
        expected: dict[str, set[str]] = {}
        steps = [DeploymentState.DOWNLOADING, DeploymentState.INSTALLING, DeploymentState.TRIAL]
        for device in devices:
            assignment = a[device.device_id]
            items = [status(assignment, s) for s in steps]
            items += [window(device.device_id, seq) for seq in range(15)]
            items += [items[4], status(assignment, DeploymentState.COMMITTED)]  # one re-sent window
            expected[device.device_id] = {msg_id(i) for i in items}
            for item in items:
                device.client.publish(item.topic, item.payload, qos=1)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(d.acked != expected[d.device_id] for d in devices):
            time.sleep(0.1)
        for device in devices:
            assert device.acked == expected[device.device_id]
    finally:
        for device in devices:
            device.close()
        bridge.stop()
    assert count(ctx, TelemetryRecord) == 15 * len(a)
    with ctx.sessions() as session:
        for dev, assignment in a.items():
            states = list(
                session.scalars(select(StatusEvent.state).where(StatusEvent.device_id == dev).order_by(StatusEvent.id))
            )
            assert states == ["downloading", "installing", "trial", "committed"]
            dep = session.get(Deployment, assignment.deployment_id)
            assert dep is not None and dep.state == "committed"
    metrics = ctx.metrics.snapshot()
    assert metrics["ingest_ok"] == 19 * len(a) and metrics["ingest_duplicate"] == len(a)
    assert metrics.get("ingest_abandoned", 0) == 0
