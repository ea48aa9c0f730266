"""Fixtures shared by every test package: real services, free ports, throwaway databases.

Integration tests use the real PostgreSQL (EDGEOTA_TEST_PG_URL, default the local ``test``
database with trust auth) and the real Mosquitto at 127.0.0.1:1883. Missing services are a
test failure, not a skip: CI starts both (see .ci/run).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("EDGEOTA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MQTT_HOST = os.environ.get("EDGEOTA_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("EDGEOTA_TEST_MQTT_PORT", "1883"))
# The suite's servers provision devices for made-up hardware profiles ("x86", "p", ...) before any release names
# them, and a server refuses a profile it does not know (ota_server.services.profiles): the session makes these
# known (server processes inherit it). Tests of the refusal pass their own hardware_profiles.
TEST_HARDWARE_PROFILES = "x86,arm,arm64,riscv,p,x86_64-avx2,arm64-pi4"
os.environ.setdefault("EDGEOTA_SERVER_HARDWARE_PROFILES", TEST_HARDWARE_PROFILES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass(frozen=True)
class Broker:
    host: str
    port: int


PRESENCE_FILTER = "edgeota/v1/devices/+/presence"


def _mqtt_client(host: str, port: int) -> object:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeota-test-sweeper-{uuid.uuid4().hex[:8]}")
    client.connect(host, port)
    return client


def retained_presence(host: str = MQTT_HOST, port: int = MQTT_PORT, quiet: float = 1.0) -> set[str]:
    """Topics holding a retained device presence message on the broker (read within ``quiet`` s of SUBACK)."""
    topics: set[str] = set()
    subscribed = threading.Event()
    client = _mqtt_client(host, port)
    client.on_message = lambda _c, _u, msg: topics.add(msg.topic) if msg.retain and msg.payload else None  # type: ignore[attr-defined]
    client.on_subscribe = lambda *_args: subscribed.set()  # type: ignore[attr-defined]
    client.loop_start()  # type: ignore[attr-defined]
    try:
        client.subscribe(PRESENCE_FILTER, qos=1)  # type: ignore[attr-defined]
        subscribed.wait(5)
        time.sleep(quiet)
    finally:
        client.loop_stop()  # type: ignore[attr-defined]
        client.disconnect()  # type: ignore[attr-defined]
    return topics


def clear_retained(topics: set[str], host: str = MQTT_HOST, port: int = MQTT_PORT) -> None:
    """Remove the retained message of each topic (an empty retained publish)."""
    if not topics:
        return
    client = _mqtt_client(host, port)
    client.loop_start()  # type: ignore[attr-defined]
    try:
        for topic in sorted(topics):
            client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # type: ignore[attr-defined]
    finally:
        client.loop_stop()  # type: ignore[attr-defined]
        client.disconnect()  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def _leave_no_retained_presence() -> Iterator[None]:
    """The suite's devices leave retained presence messages (their last will, "online"/"offline") on the shared
    broker; at the end of the session the ones that were not there before it are removed. A last will that the
    broker publishes after the session ended (a killed agent's keep-alive still running out) is not caught."""
    try:
        before: set[str] | None = retained_presence()
    except Exception:  # best effort: no shared broker (the tests that need it fail on their own), or a client error
        before = None
    yield
    if before is not None:
        with contextlib.suppress(Exception):  # best effort: a clean-up failure must not fail the session
            clear_retained(retained_presence() - before)


@pytest.fixture(scope="session")
def mqtt_broker() -> Broker:
    """The machine's Mosquitto (anonymous, 127.0.0.1:1883)."""
    wait_for_port(MQTT_HOST, MQTT_PORT, timeout=5)
    return Broker(MQTT_HOST, MQTT_PORT)


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[callable]:  # type: ignore[valid-type]
    """Start a Mosquitto of the test's own on a free port: ``start(extra_conf_lines) -> Broker``."""
    procs: list[subprocess.Popen[bytes]] = []
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

    def start(extra_conf: list[str] | None = None) -> Broker:
        port = free_port()
        conf = tmp_path / f"mosquitto-{port}.conf"
        conf.write_text("\n".join([f"listener {port} 127.0.0.1", *(extra_conf or ["allow_anonymous true"])]) + "\n")
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        wait_for_port("127.0.0.1", port)
        return Broker("127.0.0.1", port)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards.

    Yields a SQLAlchemy URL (``postgresql+psycopg://...``).
    """
    import psycopg

    name = f"edgeota_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
