"""A rollback ordered while every install is still in flight brings the whole fleet back (real server process,
real Mosquitto, emulated devices).

The emulated devices' downloads of 1.1.0 are held (``EmulatedDevice.download_delay``) so that every device is
on its way when the rollback is ordered. The rollback's own unit of work cancels each install and creates its
rollback deployment (no late report needed); the devices, which never hear the cancel, finish 1.1.0, run the
rollback they queued meanwhile, and end on 1.0.0; the late commits make no second rollback, and the rollout's
revert summary says every device reverted.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from tests.conftest import Broker
from tests.server.conftest import ADMIN, BundleFactory, Keys
from tests.server.procs import ServerProcess
from tests.server.test_server_process import wait_for

pytestmark = pytest.mark.integration
DEVICES = 24
HOLD_SECONDS = 4.0
"""How long each 1.1.0 download is held: the window in which the rollback is ordered."""


def _deployments(db: Path, rollout_id: str) -> list[tuple[str, str, str, str, str | None, str]]:
    """(device, mode, state, reason, reverted_by, id) of the rollout's deployments."""
    with sqlite3.connect(db) as conn:
        rows: list[tuple[str, str, str, str, str | None, str]] = conn.execute(
            "SELECT device_id, mode, state, reason, reverted_by, id FROM deployments WHERE rollout_id = ?",
            (rollout_id,),
        ).fetchall()
    return rows


def test_a_rollback_ordered_while_installs_are_in_flight_brings_every_device_back(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, make_bundle: BundleFactory
) -> None:
    db = tmp_path / "server.db"
    server = ServerProcess(tmp_path, f"sqlite:///{db}", keys, mqtt_broker)
    prefix = f"emh{uuid.uuid4().hex[:6]}"
    with server.running():
        v1 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.0.0", "x86").read_bytes())["release_id"]
        v2 = server.api("POST", "/api/v1/bundles", content=make_bundle("1.1.0", "x86").read_bytes())["release_id"]
        # A worker per device: a held download blocks its worker, and all devices must be held at once.
        config = EmulatorConfig(
            devices=DEVICES, server_url=server.url, admin_token=ADMIN, prefix=prefix, workers=DEVICES
        )
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
            first = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
            wait_for(
                lambda: server.api("GET", f"/api/v1/rollouts/{first}")["state"] == "completed", 60, "v1 everywhere"
            )
            assert fleet.snapshot().versions == {"1.0.0": DEVICES}

            for device in fleet.devices:
                device.download_delay = HOLD_SECONDS
            body["release_id"] = v2
            second = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]

            def in_flight() -> bool:
                # Sent to every device, some already downloading, none further: the workers take the devices'
                # commands in turn, so a few may still wait behind a held download (still in flight: notified).
                counts: dict[str, int] = server.api("GET", f"/api/v1/rollouts/{second}")["counts"]
                return counts["downloading"] > 0 and counts["notified"] + counts["downloading"] == DEVICES

            wait_for(in_flight, 30, "every device sent 1.1.0, some downloading it")
            ordered = time.monotonic()
            server.api("POST", f"/api/v1/rollouts/{second}/rollback", json={"reason": "test"})
            for device in fleet.devices:
                device.download_delay = 0.0  # the rollback's own download is not held

            # The rollback's unit of work itself cancelled every install and made every rollback deployment.
            rows = _deployments(db, second)
            installs = {r[0]: r for r in rows if r[1] == "install"}
            rollbacks = {r[0]: r for r in rows if r[1] == "rollback"}
            assert len(installs) == DEVICES and {(r[2], r[3]) for r in installs.values()} == {("failed", "cancelled")}
            assert len(rollbacks) == DEVICES
            assert all(installs[d][4] == rollbacks[d][5] for d in installs)

            # Each device finishes the cancelled 1.1.0 (it never heard the cancel), then the rollback it queued:
            # 1.0.0, 1.1.0, 1.0.0 again.
            wait_for(
                lambda: fleet.snapshot().committed == 3 * DEVICES and fleet.snapshot().versions == {"1.0.0": DEVICES},
                60,
                "every device through 1.1.0 and back on 1.0.0",
            )
            back_after = time.monotonic() - ordered
            expected = {"ordered": DEVICES, "reverted": DEVICES, "pending": 0, "not_reverted": 0}
            wait_for(
                lambda: server.api("GET", f"/api/v1/rollouts/{second}")["revert"] == expected,
                30,
                "the revert summary saying every device reverted",
            )
            print(f"every device back on 1.0.0 {back_after:.1f} s after the rollback (downloads held {HOLD_SECONDS} s)")
            assert back_after < 3 * HOLD_SECONDS + 10  # a worker may serve two held devices in turn

            # The late commits made no second rollback, and a cancelled install is never landed.
            rows = _deployments(db, second)
            assert sorted(r[0] for r in rows if r[1] == "rollback") == sorted(installs)
            assert {(r[2], r[3]) for r in rows if r[1] == "install"} == {("failed", "cancelled")}
            assert {r[2] for r in rows if r[1] == "rollback"} == {"committed"}
