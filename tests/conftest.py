"""Fixtures shared by every test package: real services, free ports, throwaway databases.

Integration tests use the real PostgreSQL (EDGEOTA_TEST_PG_URL, default the local ``test``
database with trust auth) and the real Mosquitto at 127.0.0.1:1883. Missing services are a
test failure, not a skip: CI starts both (see .ci/run).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("EDGEOTA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
MQTT_HOST = os.environ.get("EDGEOTA_TEST_MQTT_HOST", "127.0.0.1")
MQTT_PORT = int(os.environ.get("EDGEOTA_TEST_MQTT_PORT", "1883"))


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
