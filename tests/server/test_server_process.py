"""The real thing: `edgeota server run` as a process, real Mosquitto, simulated devices over MQTT.

Proves on SQLite and PostgreSQL: a canary rollout completes stage by stage; a server killed
mid-rollout resumes from the database with no device skipped or assigned twice; a device that
was offline gets its assignment when it checks in; a failing stage halts and rolls back with
every device on the previous version and the audit log telling the story.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeota_contract.provisioning import DeviceProvisioning
from tests.conftest import Broker

from .conftest import BundleFactory, Keys
from .procs import ServerProcess
from .simdevice import SimDevice

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, db_url, keys, mqtt_broker).running() as proc:
        yield proc


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def provision(server: ServerProcess, n: int, tag: str) -> list[DeviceProvisioning]:
    out = []
    for i in range(n):
        body = {"device_id": f"{tag}-{i}", "hardware_profile": "x86", "labels": {"tag": tag}}
        toml = server.api("POST", "/api/v1/devices", json=body)["agent_toml"]
        path = server.log.with_name(f"{tag}-{i}.toml")
        path.write_text(toml)
        out.append(DeviceProvisioning.load(path))
    return out


def publish(server: ServerProcess, bundle: Path) -> dict[str, Any]:
    return server.api(
        "POST",
        "/api/v1/bundles",
        content=bundle.read_bytes(),  # type: ignore[no-any-return]
        headers={"Content-Type": "application/octet-stream"},
    )


def rollout_state(server: ServerProcess, rid: str) -> dict[str, Any]:
    return server.api("GET", f"/api/v1/rollouts/{rid}")  # type: ignore[no-any-return]


def test_canary_restart_and_offline_device(server: ServerProcess, make_bundle: BundleFactory) -> None:
    tag = f"c{uuid.uuid4().hex[:8]}"
    rel = publish(server, make_bundle("1.0.0", "x86"))
    provs = provision(server, 4, tag)
    sims = {p.device.id: SimDevice(p) for p in provs}
    server.sims.extend(sims.values())
    body = {
        "release_id": rel["release_id"],
        "selector": {"labels": {"tag": tag}},
        "stages": [{"count": 1}, {"percent": 100, "requires_approval": True}],
        "gates": {"min_devices": 1, "max_failure_rate": 0.0, "device_timeout_seconds": 120},
    }
    created = server.api("POST", "/api/v1/rollouts", json=body)
    rid = created["rollout_id"]
    plan = created["preview"]["stages"]
    assert [len(s["devices"]) for s in plan] == [1, 3]
    offline = sims[plan[1]["devices"][0]]  # offline during its stage
    online = [s for s in sims.values() if s is not offline]
    for sim in online:
        sim.connect()
    server.api("POST", f"/api/v1/rollouts/{rid}/start")
    wait_for(
        lambda: (
            rollout_state(server, rid)["counts"]["committed"] == 1 and rollout_state(server, rid)["current_stage"] == 1
        ),
        what="canary stage",
    )
    assert [s.device_id for s in sims.values() if s.assignments] == plan[0]["devices"]  # only the canary so far

    server.stop(signal.SIGKILL)  # crash in the middle of the rollout
    server.start()
    assert rollout_state(server, rid)["state"] == "running"
    server.api("POST", f"/api/v1/rollouts/{rid}/approve")
    wait_for(lambda: rollout_state(server, rid)["counts"]["committed"] == 3, what="second stage on online devices")
    status = rollout_state(server, rid)
    assert status["state"] == "running" and status["counts"]["notified"] == 1  # the offline device holds it

    offline.connect()  # its check-in makes the server re-send the open deployment
    wait_for(lambda: rollout_state(server, rid)["state"] == "completed", what="completion")
    status = rollout_state(server, rid)
    assert status["counts"]["committed"] == 4 and len(status["deployments"]) == 4
    for sim in sims.values():
        assert len({a.deployment_id for a in sim.assignments}) == 1, sim.device_id  # nobody assigned twice
        shown = server.api("GET", f"/api/v1/devices/{sim.device_id}")
        assert shown["models"][0]["version"] == "1.0.0"
    assert wait_for(lambda: all(s.acked for s in sims.values()), what="acks")
    stages = server.api("GET", "/api/v1/audit", params={"entity_id": rid, "action": "rollout.stage"})
    assert [e["after"]["current_stage"] for e in stages] == [0, 1]


def test_failing_stage_halts_and_rolls_back(server: ServerProcess, make_bundle: BundleFactory) -> None:
    tag = f"f{uuid.uuid4().hex[:8]}"
    v1 = publish(server, make_bundle("1.0.0", "x86"))
    v2 = publish(server, make_bundle("2.0.0", "x86"))
    sims = [SimDevice(p) for p in provision(server, 3, tag)]
    sims[0].fail_versions.add("2.0.0")
    server.sims.extend(sims)
    for sim in sims:
        sim.connect()
    first = {"release_id": v1["release_id"], "selector": {"labels": {"tag": tag}}, "start": True}
    rid1 = server.api("POST", "/api/v1/rollouts", json=first)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid1)["state"] == "completed", what="baseline rollout")
    second = {
        "release_id": v2["release_id"],
        "selector": {"labels": {"tag": tag}},
        "stages": [{"count": 2}, {"percent": 100}],
        "on_failure": "rollback",
        "gates": {"max_failure_rate": 0.0, "min_count_for_failure_rate": 1, "device_timeout_seconds": 60},
        "start": True,
    }
    rid2 = server.api("POST", "/api/v1/rollouts", json=second)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid2)["state"] == "rolled_back", what="automatic rollback")

    def all_back() -> bool:
        return all(server.api("GET", f"/api/v1/devices/{s.device_id}")["models"][0]["version"] == "1.0.0" for s in sims)

    wait_for(all_back, what="every device back on 1.0.0")
    assert all(s.models["digits"].version == "1.0.0" for s in sims)
    status = rollout_state(server, rid2)
    assert status["reason"] == "gate_failed" and status["counts"]["rolled_back"] >= 1
    story = [e["action"] for e in server.api("GET", "/api/v1/audit", params={"entity_id": rid2})]
    assert story[0] == "rollout.create" and "rollout.running" in story and story[-1] == "rollout.rolled_back"
    rollbacks = server.api("GET", "/api/v1/audit", params={"action": "deployment.rollback"})
    reverted = {e["after"]["device_id"] for e in rollbacks}
    assert sims[0].device_id not in reverted  # it rolled back by itself
