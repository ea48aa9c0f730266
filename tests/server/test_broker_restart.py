"""A broker restart in the middle of a rollout: the server reconnects, devices check in, the DB re-sends."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, free_port, wait_for_port

from .conftest import BundleFactory, Keys
from .procs import ServerProcess
from .simdevice import SimDevice
from .test_server_process import provision, publish, rollout_state, wait_for

pytestmark = pytest.mark.integration


class OwnBroker:
    """A Mosquitto this test starts and stops itself, always on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.conf = tmp_path / "restart-broker.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[OwnBroker]:
    broker = OwnBroker(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_rollout_survives_a_broker_restart(
    tmp_path: Path, keys: Keys, own_broker: OwnBroker, make_bundle: BundleFactory
) -> None:
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'restart.db'}", keys, Broker("127.0.0.1", own_broker.port))
    sims: list[SimDevice] = []
    server.start()
    try:
        tag = f"b{uuid.uuid4().hex[:8]}"
        rel = publish(server, make_bundle("1.0.0", "x86"))
        sims = [SimDevice(p) for p in provision(server, 2, tag)]
        for sim in sims:
            sim.connect()
        own_broker.stop()  # the broker goes away...
        body = {
            "release_id": rel["release_id"],
            "selector": {"labels": {"tag": tag}},
            "start": True,
            "gates": {"device_timeout_seconds": 120},
        }
        rid = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
        wait_for(lambda: rollout_state(server, rid)["counts"]["notified"] == 2, what="assignments made")
        own_broker.start()  # ...and comes back empty: no session, no queued message survives
        wait_for(lambda: rollout_state(server, rid)["state"] == "completed", timeout=60, what="completion")
        for sim in sims:
            assert len({a.deployment_id for a in sim.assignments}) == 1
            assert server.api("GET", f"/api/v1/devices/{sim.device_id}")["models"][0]["version"] == "1.0.0"
    finally:
        for sim in sims:
            sim.disconnect()
        server.stop()
        server.http.close()
