"""The light device emulator against a real server process and real Mosquitto.

Emulated devices install a release through the real contract (signed assignment, HTTP download with the
device token, sha256, the full status sequence), are all rolled back to the previous release by the server's
rollback command, send telemetry windows that are all stored exactly once, refuse a forged command, and leave
no retained presence on the broker.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from edgeota_contract.topics import Channel, device_topic
from tests.conftest import Broker
from tests.server.conftest import ADMIN, BundleFactory, Keys
from tests.server.procs import ServerProcess

pytestmark = pytest.mark.integration
DEVICES = 40


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _retained_presence(broker: Broker, prefix: str) -> list[str]:
    seen: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")
    mine = f"edgeota/v1/devices/{prefix}-"
    client.on_message = lambda _c, _u, m: (
        seen.append(m.topic) if m.retain and m.payload and m.topic.startswith(mine) else None
    )
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.subscribe("edgeota/v1/devices/+/presence", qos=1)
    time.sleep(1.0)
    client.disconnect()
    client.loop_stop()
    return seen


def test_emulated_fleet_installs_rolls_back_and_reports(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, make_bundle: BundleFactory
) -> None:
    db = tmp_path / "server.db"
    server = ServerProcess(tmp_path, f"sqlite:///{db}", keys, mqtt_broker)
    prefix = f"emu{uuid.uuid4().hex[:6]}"
    with server.running():
        v1 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.0.0", "x86").read_bytes())["release_id"]
        v2 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.1.0", "x86").read_bytes())["release_id"]
        config = EmulatorConfig(
            devices=DEVICES, server_url=server.url, admin_token=ADMIN, prefix=prefix, telemetry_seconds=1.0, workers=4
        )
        fleet = EmulatedFleet(config)
        try:
            fleet.add(fleet.provision())
            fleet.start()
            assert fleet.wait_connected(30)
            selector = {"labels": {"fleet": prefix}}
            body: dict[str, Any] = {"release_id": v1, "selector": selector, "stages": [{"percent": 100}], "start": True}
            first = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
            _until(lambda: server.api("GET", f"/api/v1/rollouts/{first}")["state"] == "completed", 60, "v1 everywhere")
            assert fleet.snapshot().versions == {"1.0.0": DEVICES}

            body["release_id"] = v2
            second = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
            _until(lambda: fleet.snapshot().versions.get("1.1.0") == DEVICES, 60, "v2 everywhere")
            server.api("POST", f"/api/v1/rollouts/{second}/rollback", json={"reason": "test"})
            _until(lambda: fleet.snapshot().versions == {"1.0.0": DEVICES}, 60, "every device back on v1")

            # A command not signed by the server key is refused.
            forger = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"forger-{uuid.uuid4().hex[:6]}")
            forger.connect(mqtt_broker.host, mqtt_broker.port)
            forger.loop_start()
            forger.publish(
                device_topic(f"{prefix}-000000", Channel.CMD), b'{"body": "{}", "sig": "x"}', qos=1
            ).wait_for_publish(5)
            forger.disconnect()
            forger.loop_stop()
            _until(lambda: fleet.snapshot().rejected_commands >= 1, 10, "the forged command refused")

            fleet.stop_telemetry()
            assert fleet.drain(60), "windows still unacknowledged"
            sent = fleet.snapshot().telemetry_sent
            assert sent > 0
        finally:
            fleet.stop()
    with sqlite3.connect(db) as conn:
        stored, distinct = conn.execute(
            "SELECT count(*), count(DISTINCT device_id || boot_id || seq) FROM telemetry_windows WHERE device_id LIKE ?",
            (f"{prefix}-%",),
        ).fetchone()
    assert stored == distinct == sent  # sent = stored, none doubled
    assert _retained_presence(mqtt_broker, prefix) == []


def test_rollback_reaches_every_device_with_two_ingest_processes(
    tmp_path: Path, pg_url: str, keys: Keys, mqtt_broker: Broker, make_bundle: BundleFactory
) -> None:
    """PostgreSQL, two ``edgeota server ingest`` processes, an API process that only publishes: a fleet rolled
    back right after it committed comes back whole. (Reports applied in another process than the rollback's
    decision used to overwrite a cancellation that committed meanwhile, and those devices were never reverted.)"""
    from .test_shared_ingest import ingest_process

    server = ServerProcess(tmp_path, pg_url, keys, mqtt_broker)
    group = f"g{uuid.uuid4().hex[:8]}"
    server.env.update({"EDGEOTA_SERVER_MQTT_SHARED_GROUP": group, "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"})
    prefix = f"emr{uuid.uuid4().hex[:6]}"
    devices = 120
    with server.running(), ingest_process(server, 0), ingest_process(server, 1):
        v1 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.0.0", "x86").read_bytes())["release_id"]
        v2 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.1.0", "x86").read_bytes())["release_id"]
        config = EmulatorConfig(devices=devices, server_url=server.url, admin_token=ADMIN, prefix=prefix, workers=4)
        with EmulatedFleet(config) as fleet:
            fleet.add(fleet.provision())
            fleet.start()
            assert fleet.wait_connected(30)
            body: dict[str, Any] = {
                "release_id": v1,
                "selector": {"labels": {"fleet": prefix}},
                "stages": [{"percent": 100}],
                "start": True,
            }
            server.api("POST", "/api/v1/rollouts", json=body)
            _until(lambda: fleet.snapshot().versions.get("1.0.0") == devices, 60, "v1 everywhere")
            body["release_id"] = v2
            second = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
            # Roll back the moment the devices say they run v2: many committed reports are still in flight.
            _until(lambda: fleet.snapshot().versions.get("1.1.0") == devices, 60, "v2 everywhere")
            server.api("POST", f"/api/v1/rollouts/{second}/rollback", json={"reason": "test"})
            _until(lambda: fleet.snapshot().versions == {"1.0.0": devices}, 60, "every device back on v1")
            status = server.api("GET", f"/api/v1/rollouts/{second}")
            assert status["revert"]["not_reverted"] == 0, status["revert"]
