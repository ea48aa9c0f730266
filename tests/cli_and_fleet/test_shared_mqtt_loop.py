"""The shared MQTT network loop: 300 links in one process on fds above select()'s limit, real Mosquitto.

Proves: every link connects, receives its own commands in order and publishes; a broker restart
(every connection dropped by the broker side) and a session takeover are followed by reconnects;
``abort()`` makes the broker publish the last will; ``stop()`` frees every socket; and the links
add no thread of their own.
"""

from __future__ import annotations

import json
import os
import resource
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.transport.mqtt import MqttLink
from edgeota.broker import RunningBroker, start_broker
from edgeota.fleet.mqtt_loop import SharedNetworkLoop
from edgeota_contract.provisioning import MqttSection
from edgeota_contract.topics import Channel

LINKS = 300
SELECT_LIMIT = 1024  # FD_SETSIZE: select() cannot watch a descriptor numbered this high or above


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Watcher:
    """A plain paho client that publishes commands and records what devices publish.

    Its socket is numbered above 1023 too, so paho's own select() loop cannot run it: it runs on a
    shared loop of its own, separate from the devices'.
    """

    def __init__(self, broker: RunningBroker) -> None:
        self.got: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        ready = threading.Event()
        self.loop = SharedNetworkLoop(name="watcher", workers=1)
        self.loop.start()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *args: c.subscribe(
            [("edgeota/v1/devices/+/status", 1), ("edgeota/v1/devices/+/presence", 1)]
        )
        self.client.on_subscribe = lambda *args: ready.set()
        self.client.connect_async(broker.host, broker.port)
        self.loop.add(self.client)
        assert ready.wait(10)

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.setdefault(msg.topic, []).append(bytes(msg.payload))

    def of(self, topic: str) -> list[bytes]:
        with self.lock:
            return list(self.got.get(topic, []))

    def close(self) -> None:
        self.client.disconnect()
        self.loop.remove(self.client)
        self.loop.stop()


class Device:
    def __init__(self, device_id: str, broker: RunningBroker, loop: SharedNetworkLoop) -> None:
        self.commands: list[bytes] = []
        self.connects = 0
        settings = MqttSection(host=broker.host, port=broker.port, keepalive=30, protocol="auto")
        self.link = MqttLink(device_id, "boot-1", settings, network_loop=loop)

    def _connected(self) -> None:
        self.connects += 1


@pytest.fixture
def many_fds() -> Iterator[None]:
    """Hold descriptors 3..1100 open so that every socket opened by the test is numbered above 1023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = []
    while True:
        fd = os.open(os.devnull, os.O_RDONLY)
        held.append(fd)
        if fd >= SELECT_LIMIT + 80:
            break
    try:
        yield
    finally:
        for fd in held:
            os.close(fd)


@pytest.mark.integration
def test_one_loop_drives_300_links_reconnects_and_aborts(tmp_path: Path, many_fds: None) -> None:
    broker = start_broker("mosquitto", data_dir=tmp_path / "broker")
    loop = SharedNetworkLoop(workers=4)
    loop.start()
    threads_before = threading.active_count()
    prefix = f"sl{uuid.uuid4().hex[:6]}"
    devices = [Device(f"{prefix}-{i:04d}", broker, loop) for i in range(LINKS)]
    watcher = Watcher(broker)
    try:
        for d in devices:
            d.link.start(d.commands.append, d._connected)
        _until(lambda: all(d.link.connected for d in devices), 60, "all links connected")
        fds = [d.link._client.socket().fileno() for d in devices]  # type: ignore[union-attr]
        # Beyond what paho's own select() loop can serve. A few low descriptors may be freed by an earlier
        # test's cleanup after the fixture filled them, so a handful of links can land below the limit.
        assert sum(fd >= SELECT_LIMIT for fd in fds) >= LINKS - 20
        assert loop.stats()["clients"] == LINKS
        # No thread per link: the 300 links run on the loop's 5 threads (loop + 4 workers).
        assert threading.active_count() - threads_before <= 2  # the watcher's own loop and worker
        assert loop.thread_count == 5

        # Commands in, in order per device; reports out.
        for d in devices:
            for n in range(3):
                watcher.client.publish(d.link.topic(Channel.CMD), f"{d.link.device_id}:{n}".encode(), qos=1)
        _until(lambda: all(len(d.commands) == 3 for d in devices), 60, "3 commands per device")
        assert all(d.commands == [f"{d.link.device_id}:{n}".encode() for n in range(3)] for d in devices)
        for d in devices:
            assert d.link.send(Channel.STATUS, b'{"n": 1}')
        _until(lambda: all(watcher.of(d.link.topic(Channel.STATUS)) for d in devices), 60, "a report per device")

        # The broker goes away and comes back on the same port: every link reconnects on its own.
        port = broker.port
        broker.stop()
        _until(lambda: not any(d.link.connected for d in devices), 30, "all links to notice the broker is gone")
        broker = start_broker("mosquitto", port=port, data_dir=tmp_path / "broker")
        watcher.close()
        watcher = Watcher(broker)
        _until(lambda: all(d.link.connected and d.connects >= 2 for d in devices), 90, "all links reconnected")
        for d in devices:
            assert d.link.send(Channel.STATUS, b'{"n": 2}')
        _until(lambda: all(watcher.of(d.link.topic(Channel.STATUS)) for d in devices), 60, "a report after restart")
        watcher.client.publish(devices[7].link.topic(Channel.CMD), b"after-restart", qos=1)
        _until(lambda: devices[7].commands[-1:] == [b"after-restart"], 30, "a command after the restart")

        # A session takeover is a broker-side disconnect of one connection: that link reconnects too.
        victim = devices[3]
        taker = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=victim.link.device_id)
        taker.connect_async(broker.host, broker.port)
        watcher.loop.add(taker)
        _until(lambda: not victim.link.connected, 30, "the taken-over link to be disconnected")
        taker.disconnect()
        watcher.loop.remove(taker)
        _until(lambda: victim.link.connected and victim.connects >= 3, 30, "the taken-over link back")

        # abort(): no DISCONNECT, so the broker publishes the device's last will (offline).
        gone = devices[5]
        presence = gone.link.topic(Channel.PRESENCE)
        gone.link.abort()
        _until(lambda: any(not json.loads(p)["online"] for p in watcher.of(presence) if p), 30, "the last will")
        assert loop.stats()["clients"] == LINKS - 1
    finally:
        for d in devices:
            d.link.stop(timeout=2)
        clients_left = loop.stats()["clients"]
        loop.stop()
        watcher.close()
        broker.stop()
    assert clients_left == 0
    assert all(d.link._client is None for d in devices)
