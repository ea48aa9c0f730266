"""Telemetry ingest under real faults: a real server process, the real broker, a real PostgreSQL of the test's own.

- The server is killed (SIGKILL) after it committed a batch and before it published the acks. After a
  restart, the device's re-sends are stored once: nothing lost, nothing doubled.
- PostgreSQL is stopped in the middle of ingest (immediate shutdown, as a crash): the server keeps running,
  acknowledges nothing it did not store, and once the database is back the backlog the devices re-send
  drains while new data keeps flowing; every window is stored exactly once.

A device here acts like the agent: it keeps every unacknowledged message and re-sends it until acked.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS
from edgeota_contract.topics import Channel, device_topic
from tests.conftest import Broker, free_port

from . import procs
from .conftest import Keys
from .procs import ServerProcess

pytestmark = pytest.mark.integration

# `edgeota server run`, with the ack dispatch wrapped: SIGKILL once the named device is about to be acked,
# that is after its messages' transaction committed and before any ack left.
KILL_BEFORE_ACK = """#!{python}
import os, runpy, signal, sys
import ota_server.rollout.unit_of_work as unit_of_work
victim = os.environ["EDGEOTA_TEST_KILL_BEFORE_ACK"]
original = unit_of_work.send_ack
def ack_or_die(ctx, device_id, msg_ids):
    if device_id == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    original(ctx, device_id, msg_ids)
unit_of_work.send_ack = ack_or_die
sys.argv = ["edgeota", *sys.argv[1:]]
runpy.run_module("edgeota.cli", run_name="__main__")
"""


class ResendingDevice:
    """Publishes telemetry windows and re-sends each one until the server acknowledges it (as the agent does)."""

    def __init__(self, broker: Broker, device_id: str) -> None:
        self.device_id = device_id
        self.boot_id = uuid.uuid4().hex
        self.seq = 0
        self.unacked: dict[str, bytes] = {}
        self.acked: set[str] = set()
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{device_id}-{self.boot_id[:6]}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: ready.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(device_topic(device_id, Channel.CMD), qos=1)
        assert ready.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        body = json.loads(json.loads(msg.payload)["body"])
        if body.get("kind") == "ack":
            with self.lock:
                for msg_id in body["msg_ids"]:
                    self.acked.add(msg_id)
                    self.unacked.pop(msg_id, None)

    def send(self, count: int) -> None:
        for _ in range(count):
            self.seq += 1
            start = datetime.now(UTC) - timedelta(seconds=1)
            latency = [0] * (len(LATENCY_EDGES_MS) + 1)
            latency[2] = 3
            window = TelemetryWindow(
                boot_id=self.boot_id,
                seq=self.seq,
                model_name="digits",
                version="1.0.0",
                bundle_sha256="a" * 64,
                window_start=start,
                window_end=start + timedelta(seconds=1),
                request_count=3,
                error_count=0,
                latency_counts=latency,
            )
            payload = window.model_dump_json().encode()
            with self.lock:
                self.unacked[window.msg_id] = payload
            self.client.publish(device_topic(self.device_id, Channel.TELEMETRY), payload, qos=1)

    def resend(self) -> None:
        with self.lock:
            pending = list(self.unacked.values())
        for payload in pending:
            self.client.publish(device_topic(self.device_id, Channel.TELEMETRY), payload, qos=1)

    def pending(self) -> int:
        with self.lock:
            return len(self.unacked)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _until(check: Callable[[], bool], timeout: float, what: str, tick: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if tick is not None:
            tick()
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _register(server: ServerProcess, device_id: str) -> None:
    server.api("POST", "/api/v1/devices", json={"device_id": device_id, "hardware_profile": "x86"})


# ------------------------------------------------------------------ killed between commit and ack


def _sqlite_windows(db: Path, device_id: str) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT boot_id, seq FROM telemetry_windows WHERE device_id = ?", (device_id,))
        return [(str(b), int(s)) for b, s in rows]


def test_a_server_killed_between_commit_and_ack_loses_and_doubles_nothing(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "server.db"
    device_id = f"ack-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path, f"sqlite:///{db}", keys, mqtt_broker)
    killer = tmp_path / "edgeota-kill-before-ack"
    killer.write_text(KILL_BEFORE_ACK.format(python=sys.executable))
    killer.chmod(killer.stat().st_mode | stat.S_IXUSR)
    device: ResendingDevice | None = None
    try:
        srv.start()
        _register(srv, device_id)
        srv.stop()
        original = procs.EDGEOTA
        monkeypatch.setattr(procs, "EDGEOTA", str(killer))
        srv.env["EDGEOTA_TEST_KILL_BEFORE_ACK"] = device_id
        srv.start()
        device = ResendingDevice(mqtt_broker, device_id)
        device.send(40)
        assert srv.proc is not None
        srv.proc.wait(timeout=60)
        assert srv.proc.returncode == -signal.SIGKILL
        stored = _sqlite_windows(db, device_id)
        assert stored and not device.acked  # committed, never acknowledged: the window under test was hit
        monkeypatch.setattr(procs, "EDGEOTA", original)
        del srv.env["EDGEOTA_TEST_KILL_BEFORE_ACK"]
        srv.start()
        _until(lambda: device.pending() == 0, 60, "every window acknowledged", tick=device.resend)  # type: ignore[union-attr]
        final = _sqlite_windows(db, device_id)
        assert sorted(final) == [(device.boot_id, seq) for seq in range(1, 41)]  # each once, none lost
        metrics = srv.api("GET", "/api/v1/metrics")
        assert metrics.get("ingest_duplicate", 0) >= len(stored)  # the re-sent stored ones were recognised
    finally:
        if device is not None:
            device.close()
        srv.stop()
        srv.http.close()


# ------------------------------------------------------------------ PostgreSQL down during ingest


@dataclass
class Postgres:
    """A PostgreSQL cluster of the test's own (initdb + pg_ctl, run as the ``postgres`` user)."""

    bindir: Path
    folder: Path
    port: int

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bindir / "pg_ctl"), "-D", str(self.folder / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.folder} -c fsync=off"
        self._ctl("-w", "-l", str(self.folder / "log"), "-o", opts, "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-w", "-m", mode, "stop")

    def count(self, device_id: str) -> list[tuple[str, int]]:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres") as conn:
            rows = conn.execute("SELECT boot_id, seq FROM telemetry_windows WHERE device_id = %s", (device_id,))
            return [(str(b), int(s)) for b, s in rows]


@pytest.fixture
def own_postgres() -> Iterator[Postgres]:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are needed")
    folder = Path(tempfile.mkdtemp(prefix="edgeota-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    pg = Postgres(found[-1].parent, folder, free_port())
    initdb = [str(pg.bindir / "initdb"), "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"]
    subprocess.run(
        ["runuser", "-u", "postgres", "--", *initdb],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pg.start()
    try:
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            pg.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def test_postgresql_stopped_during_ingest_then_the_backlog_drains_exactly_once(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, own_postgres: Postgres
) -> None:
    device_id = f"pgdown-{uuid.uuid4().hex[:8]}"
    srv = ServerProcess(tmp_path, own_postgres.url, keys, mqtt_broker)
    device: ResendingDevice | None = None
    with srv.running():
        _register(srv, device_id)
        try:
            device = ResendingDevice(mqtt_broker, device_id)
            device.send(30)
            _until(lambda: device.pending() == 0, 30, "the first windows acknowledged")  # type: ignore[union-attr]
            own_postgres.stop("immediate")  # a crash of the database server
            device.send(30)
            time.sleep(3)
            assert device.pending() == 30  # nothing acknowledged that was not stored
            health = httpx.get(f"{srv.url}/healthz", timeout=10)
            assert health.status_code < 600 and srv.proc is not None and srv.proc.poll() is None  # server alive
            own_postgres.start()
            device.send(30)  # live data after the recovery
            _until(lambda: device.pending() == 0, 90, "the backlog drained", tick=device.resend)  # type: ignore[union-attr]
            stored = own_postgres.count(device_id)
            assert sorted(stored) == [(device.boot_id, seq) for seq in range(1, 91)]
            assert srv.api("GET", "/api/v1/metrics").get("ingest_batch_failed", 0) >= 1  # the outage was seen
        finally:
            if device is not None:
                device.close()
