"""MQTT helpers for tests: a recording subscriber and a Mosquitto the test can stop and restart."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port, wait_for_port


class Recorder:
    """Subscribes to one device's topics and records (channel, payload) as they arrive."""

    def __init__(self, host: str, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"rec-{device_id}-{time.monotonic_ns()}"
        )
        self.client.on_message = self._on_message
        self._ready = threading.Event()
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"edgeota/v1/devices/{device_id}/#", qos=1)
        # ready once the broker acknowledged the subscription (a slow broker, amqtt on a loaded box, may take
        # longer than any fixed pause after the connect)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self._ready.set()
        self.client.connect(host, port)
        self.client.loop_start()
        assert self._ready.wait(20)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        channel = msg.topic.rsplit("/", 1)[1]
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = {"raw": msg.payload.decode("utf-8", "replace")}
        with self.lock:
            self.messages.append((channel, payload))

    def of(self, channel: str) -> list[dict[str, Any]]:
        with self.lock:
            return [p for c, p in self.messages if c == channel]

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return False

    def publish_cmd(self, payload: bytes) -> None:
        self.client.publish(f"edgeota/v1/devices/{self.device_id}/cmd", payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        # clear the retained presence so the shared broker keeps no state from this test
        self.client.publish(f"edgeota/v1/devices/{self.device_id}/presence", b"", qos=1, retain=True).wait_for_publish(
            5
        )
        self.client.disconnect()
        self.client.loop_stop()


class StoppableMosquitto:
    """A private Mosquitto on a fixed free port that a test can stop and start again."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.conf = folder / f"mosquitto-{self.port}.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
