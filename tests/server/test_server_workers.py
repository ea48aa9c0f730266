"""`edgeota server run --workers 2` as a process: a core (engine + MQTT bridge) and two API workers.

With real Mosquitto, simulated devices and both databases, it proves: per-device retries (a device
whose first download fails is re-assigned and the rollout completes, its history showing both
attempts), commands decided in an API worker (a manual rollback) delivered through the core's bridge,
the HTTP command poll (device-token only, signed payloads the device verifies, idempotent), a killed
API worker replaced by the core, and a clear error for a port in use.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgeota_contract.messages import Assignment, verify_command
from edgeota_contract.signing import TrustedKeys
from tests.conftest import Broker

from .conftest import ADMIN, BundleFactory, Keys
from .procs import ServerProcess
from .simdevice import SimDevice
from .test_server_process import provision, publish, rollout_state, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def workers_server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    # start() waits until a worker's /healthz reports the core's bridge connected
    with ServerProcess(tmp_path, db_url, keys, mqtt_broker, workers=2).running() as proc:
        yield proc


def test_transient_failure_is_retried_and_the_rollout_completes(
    workers_server: ServerProcess, make_bundle: BundleFactory
) -> None:
    server = workers_server
    tag = f"r{uuid.uuid4().hex[:8]}"
    rel = publish(server, make_bundle("1.0.0", "x86"))
    provs = provision(server, 2, tag)
    flaky = SimDevice(provs[0], flaky_downloads=1)
    steady = SimDevice(provs[1])
    server.sims.extend([flaky, steady])
    for sim in (flaky, steady):
        sim.connect()
    body = {
        "release_id": rel["release_id"],
        "selector": {"labels": {"tag": tag}},
        "stages": [{"percent": 100}],
        "gates": {"min_devices": 2, "max_failure_rate": 0.0, "min_count_for_failure_rate": 1},
        "max_retries": 2,
        "retry_backoff_seconds": 0.5,
        "start": True,
    }
    rid = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid)["state"] in ("completed", "rolled_back"), what="rollout end")
    status = rollout_state(server, rid)
    assert status["state"] == "completed", status["detail"]  # the failed first attempt did not trip the gate
    assert status["counts"]["committed"] == 2 and status["counts"]["failed"] == 0
    assert status["retries"] == {"retried_attempts": 1, "waiting": 0}

    history = server.api("GET", f"/api/v1/devices/{flaky.device_id}")["deployments"]
    attempts = sorted((d["attempt"], d["state"], d["reason"], d["retried"]) for d in history)
    assert attempts == [(1, "failed", "download_failed", True), (2, "committed", "ok", False)]
    assert len({a.deployment_id for a in flaky.assignments}) == 2  # each attempt is its own deployment
    retries = server.api("GET", "/api/v1/audit", params={"action": "deployment.retry"})
    assert [e["before"]["attempt"] for e in retries] == [1]

    # A manual rollback is decided in an API worker: its commands reach the devices through the core.
    v2 = publish(server, make_bundle("1.1.0", "x86"))
    upgrade = {**body, "release_id": v2["release_id"], "max_retries": 0}
    rid2 = server.api("POST", "/api/v1/rollouts", json=upgrade)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid2)["state"] == "completed", what="the upgrade")
    server.api("POST", f"/api/v1/rollouts/{rid2}/rollback", json={"reason": "test"})
    wait_for(lambda: rollout_state(server, rid2)["rollback_counts"] == {"committed": 2}, what="devices reverted")
    for sim in (flaky, steady):
        assert server.api("GET", f"/api/v1/devices/{sim.device_id}")["models"][0]["version"] == "1.0.0"

    def core_counted() -> dict[str, int]:  # ingest runs in the core only; a worker shows the core's counters
        counts: dict[str, int] = server.api("GET", "/api/v1/metrics")
        return counts if counts.get("commands_forwarded", 0) >= 2 and counts.get("ingest_ok") else {}

    wait_for(core_counted, what="the core's counters in a worker's metrics")


def _api_workers(core_pid: int) -> set[int]:
    """PIDs of the core's API worker processes (spawned children, not the resource tracker)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(line for line in status.read_text().splitlines() if line.startswith("PPid:"))
            cmdline = status.with_name("cmdline").read_bytes()
        except (OSError, StopIteration):
            continue
        if int(ppid.split()[1]) == core_pid and b"spawn_main" in cmdline:
            found.add(int(status.parent.name))
    return found


def _kill_a_worker_and_see_it_replaced(server: ServerProcess) -> None:
    assert server.proc is not None
    core = server.proc.pid

    def two_workers() -> set[int]:
        workers = _api_workers(core)
        return workers if len(workers) == 2 else set()

    before = wait_for(two_workers, what="two API workers")
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    after = wait_for(lambda: victim not in (w := two_workers()) and w, what="a replacement worker")
    assert len(after - before) == 1
    assert server.http.get("/healthz").json() == {"status": "ok", "mqtt_connected": True}


def test_http_poll_serves_signed_commands_to_the_device_only(
    workers_server: ServerProcess, make_bundle: BundleFactory
) -> None:
    server = workers_server
    tag = f"p{uuid.uuid4().hex[:8]}"
    rel = publish(server, make_bundle("1.0.0", "x86"))
    poller, other = provision(server, 2, tag)  # neither connects to MQTT: a pull-only device
    body = {
        "release_id": rel["release_id"],
        "selector": {"device_ids": [poller.device.id]},
        "start": True,
    }
    rid = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
    url = f"{server.url}/api/v1/devices/{poller.device.id}/commands"
    mine = {"Authorization": f"Bearer {poller.server.token}"}

    def poll() -> list[object]:
        resp = httpx.get(url, headers=mine, timeout=10)
        assert resp.status_code == 200, resp.text
        commands: list[object] = resp.json()["commands"]
        return commands

    first = wait_for(poll, what="an open deployment to poll")
    keys = TrustedKeys.from_pems(poller.trust.server_keys)
    (command,) = [verify_command(json.dumps(obj).encode(), keys, poller.device.id) for obj in first]
    assert isinstance(command, Assignment) and command.rollout_id == rid and command.version == "1.0.0"
    assert command.bundle_url == f"/api/v1/artifacts/{command.bundle_sha256}"
    again = verify_command(json.dumps(poll()[0]).encode(), keys, poller.device.id)
    assert isinstance(again, Assignment)
    assert (again.deployment_id, again.assignment_id) == (command.deployment_id, command.assignment_id)
    assert again.nonce != command.nonce  # freshly signed each time
    assert rollout_state(server, rid)["counts"]["notified"] == 1  # polls change nothing

    refusals = [
        ({}, 401),
        ({"Authorization": "Bearer dev:nobody.secret"}, 401),
        ({"Authorization": f"Bearer {other.server.token}"}, 403),  # another device's token
        ({"Authorization": f"Bearer {ADMIN}"}, 403),  # an API token is not the device
    ]
    for headers, status in refusals:
        resp = httpx.get(url, headers=headers, timeout=10)
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
    # Nothing for the other device; and a malformed id is refused before any lookup.
    other_url = f"{server.url}/api/v1/devices/{other.device.id}/commands"
    other_auth = {"Authorization": f"Bearer {other.server.token}"}
    assert httpx.get(other_url, headers=other_auth, timeout=10).json() == {"commands": []}
    assert httpx.get(f"{server.url}/api/v1/devices/bad%20id/commands", headers=mine, timeout=10).status_code == 422

    # The device acts on the polled command: it downloads, installs and reports over MQTT.
    sim = SimDevice(poller)
    server.sims.append(sim)
    sim.inbox.put(json.dumps(first[0]).encode())  # queued before anything MQTT may re-send on check-in
    sim.connect()
    wait_for(lambda: rollout_state(server, rid)["state"] == "completed", what="the polled install to commit")
    assert sim.rejected == 0 and sim.assignments[0].nonce == command.nonce
    assert poll() == []  # nothing open any more

    _kill_a_worker_and_see_it_replaced(server)  # the core replaces a dead API worker
    assert poll() == []


def test_workers_refuse_a_port_in_use_with_one_line(tmp_path: Path) -> None:
    import socket
    import subprocess

    from .procs import EDGEOTA

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        env = {
            **os.environ,
            "EDGEOTA_SERVER_DATA_DIR": str(tmp_path / "data"),
            "EDGEOTA_SERVER_MQTT_ENABLED": "false",
        }
        done = subprocess.run(
            [EDGEOTA, "server", "run", "--port", str(port), "--workers", "1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot listen on 127.0.0.1")
    assert "Traceback" not in done.stderr
