"""A server-ordered rollback, end to end: `edgeota server run`, real Mosquitto, simulated devices over MQTT.

The devices check in all the time (every 50 ms) while the rollback runs, so check-ins arrive before,
during and after the rollback deployments' reports, as in the soak that found the bug: afterwards every
committed install is ``rolled_back``/``server_rollback`` and a new rollout's dry run targets every device.
On SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker

from .conftest import BundleFactory, Keys
from .procs import ServerProcess
from .simdevice import SimDevice
from .test_server_process import provision, publish, rollout_state, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, db_url, keys, mqtt_broker).running() as proc:
        yield proc


def _roll_out(server: ServerProcess, release_id: str, tag: str) -> str:
    body = {"release_id": release_id, "selector": {"labels": {"tag": tag}}, "stages": [{"percent": 100}], "start": True}
    rid: str = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid)["state"] == "completed", 60, f"rollout {rid} to complete")
    return rid


def test_rollback_then_checkins_then_a_new_rollout_targets_every_device(
    server: ServerProcess, make_bundle: BundleFactory
) -> None:
    tag = f"rb{uuid.uuid4().hex[:8]}"
    old = publish(server, make_bundle("1.0.0", "x86"))["release_id"]
    new = publish(server, make_bundle("1.1.0", "x86"))["release_id"]
    sims = [SimDevice(p) for p in provision(server, 4, tag)]
    server.sims.extend(sims)
    for sim in sims:
        sim.connect()
    _roll_out(server, old, tag)
    rid = _roll_out(server, new, tag)

    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(0.05):
            for sim in sims:
                sim.checkin()

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        assert server.api("POST", f"/api/v1/rollouts/{rid}/rollback")["state"] == "rolled_back"
        wait_for(lambda: rollout_state(server, rid)["rollback_counts"].get("committed") == 4, 60, "every device back")
        wait_for(lambda: all(s.models["digits"].version == "1.0.0" for s in sims), 30, "devices on 1.0.0")
    finally:
        stop.set()
        beat.join(timeout=5)
    for sim in sims:  # one more check-in each, after everything: the one that used to relabel
        sim.checkin()

    def installs_landed() -> bool:
        deps = server.api("GET", f"/api/v1/rollouts/{rid}")["deployments"]
        installs = [(d["state"], d["reason"]) for d in deps if d["mode"] == "install"]
        return installs == [("rolled_back", "server_rollback")] * 4

    wait_for(installs_landed, 30, "every install recorded as a server rollback")
    status = rollout_state(server, rid)
    assert status["reverted"] is True and status["halted_by"] is None
    devices = {s.device_id for s in sims}
    for device_id in devices:
        detail = server.api("GET", f"/api/v1/devices/{device_id}")
        assert detail["models"][0]["version"] == "1.0.0"
        assert "health_failed" not in {d["reason"] for d in detail["deployments"]}
    body = {"release_id": new, "selector": {"labels": {"tag": tag}}, "dry_run": True}
    dry = server.api("POST", "/api/v1/rollouts", json=body)
    assert dry["skipped_rolled_back_before"] == [] and dry["eligible"] == 4
    assert set(dry["stages"][-1]["devices"]) == devices
