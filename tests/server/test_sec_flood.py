"""One device floods through the real broker against a real server process with default settings.

The server's own limiter, built from its settings (``ingest_rate_per_device``, ``ingest_burst_per_device``),
must hold the flooding device to its burst plus its rate, while another device's messages all get through.
What a device sees of it: only stored messages are acknowledged (rate-limited ones stay in its retry queue).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeota_contract.messages import CheckIn
from edgeota_contract.topics import Channel, device_topic
from ota_server.core.config import Settings
from tests.conftest import Broker

from .conftest import Keys
from .procs import ServerProcess

pytestmark = pytest.mark.integration

FLOOD = 1000
QUIET = 30


class Device:
    """A bare MQTT device: publishes check-ins, collects the msg ids the server acknowledges."""

    def __init__(self, broker: Broker, device_id: str) -> None:
        self.device_id = device_id
        self.boot_id = uuid.uuid4().hex
        self.acked: set[str] = set()
        self.ack_times: list[float] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{self.boot_id[:6]}")
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(100)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(device_topic(device_id, Channel.CMD), qos=1)
        assert ready.wait(5)
        self.seq = 0

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        body = json.loads(json.loads(msg.payload)["body"])
        if body.get("kind") == "ack":
            with self.lock:
                self.acked.update(body["msg_ids"])
                self.ack_times.append(time.monotonic())

    def checkin(self) -> Any:
        self.seq += 1
        msg = CheckIn(boot_id=self.boot_id, seq=self.seq, hardware_profile="x86", agent_version="flood")
        return self.client.publish(device_topic(self.device_id, Channel.CHECKIN), msg.model_dump_json(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _settle(devices: list[Device], quiet_seconds: float = 2.0, limit: float = 60.0) -> None:
    """Wait until no acknowledgement has arrived for ``quiet_seconds``."""
    deadline = time.monotonic() + limit
    last = -1
    since = time.monotonic()
    while time.monotonic() < deadline:
        count = sum(len(d.acked) for d in devices)
        if count != last:
            last, since = count, time.monotonic()
        elif time.monotonic() - since > quiet_seconds:
            return
        time.sleep(0.1)


def test_the_default_rate_limit_holds_a_flooding_device_and_spares_the_others(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker
) -> None:
    defaults = Settings.model_fields
    rate = float(defaults["ingest_rate_per_device"].default)
    burst = int(defaults["ingest_burst_per_device"].default)
    assert burst < FLOOD / 2  # the flood is well past what the default may let through
    srv = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", keys, mqtt_broker)
    devices: list[Device] = []
    with srv.running():
        tag = uuid.uuid4().hex[:6]
        noisy_id, quiet_id = f"noisy-{tag}", f"quiet-{tag}"
        for dev in (noisy_id, quiet_id):
            srv.api("POST", "/api/v1/devices", json={"device_id": dev, "hardware_profile": "x86"})
        try:
            noisy, quiet = Device(mqtt_broker, noisy_id), Device(mqtt_broker, quiet_id)
            devices += [noisy, quiet]
            started = time.monotonic()
            pending = []
            for i in range(FLOOD):
                pending.append(noisy.checkin())
                if i % (FLOOD // QUIET) == 0 and quiet.seq < QUIET:
                    pending.append(quiet.checkin())
            while quiet.seq < QUIET:
                pending.append(quiet.checkin())
            for info in pending:
                info.wait_for_publish(30)
            _settle(devices)
            metrics = srv.api("GET", "/api/v1/metrics")
        finally:
            for d in devices:
                d.close()
    assert noisy.ack_times, "the server acknowledged nothing"
    span = max(noisy.ack_times) - started
    # Every acknowledged message took a token: at most the burst plus what the rate refilled meanwhile.
    assert burst <= len(noisy.acked) <= burst + rate * span + 1, (len(noisy.acked), span)
    assert len(noisy.acked) < FLOOD
    assert metrics.get("ingest_rate_limited", 0) >= FLOOD - len(noisy.acked)
    assert len(quiet.acked) == QUIET  # the other device is unaffected
