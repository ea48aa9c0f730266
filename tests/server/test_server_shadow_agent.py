"""The shadow strategy with a real device agent process (real Mosquitto, real server process, both databases).

The device first installs 1.0.0 through a normal rollout; a shadow rollout of 1.1.0 (same weights) then
runs the candidate beside the serving model. The agent's own shadow summaries reach the server in its
telemetry windows: the agreement is reported (and passes the ``min_shadow_agreement`` gate), the rollout
completes, and the device keeps serving 1.0.0: no switch.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeota_contract.provisioning import DeviceProvisioning
from tests.agent.bundles import make_bundle as make_agent_bundle
from tests.conftest import Broker

from .conftest import Keys
from .procs import ServerProcess
from .test_server_process import publish, rollout_state, wait_for

pytestmark = pytest.mark.integration
PROFILE = "x86_64-avx2"
DRIVER = Path(__file__).with_name("server_shadow_driver.py")


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, db_url, keys, mqtt_broker)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.http.close()


@pytest.fixture
def device(server: ServerProcess, tmp_path: Path) -> Iterator[str]:
    """A provisioned device whose agent runs in its own application process; yields its id."""
    device_id = f"shadow-{uuid.uuid4().hex[:8]}"
    body = {"device_id": device_id, "hardware_profile": PROFILE}
    prov = DeviceProvisioning.model_validate(
        tomllib.loads(server.api("POST", "/api/v1/devices", json=body)["agent_toml"])
    )
    prov.agent.update(
        {
            "state_dir": str(tmp_path / "agent-state"),
            "telemetry_window_seconds": 1.0,
            "heartbeat_seconds": 2.0,
            "trial_seconds": 2.0,
            "trial_requests": 20,
        }
    )
    config = tmp_path / "agent.toml"
    config.write_text(prov.to_toml())
    log = tmp_path / "agent.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(DRIVER), str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield device_id
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _serving(server: ServerProcess, device_id: str) -> list[Any]:
    return [(m["model_name"], m["version"]) for m in server.api("GET", f"/api/v1/devices/{device_id}")["models"]]


def test_shadow_rollout_reports_agreement_and_never_switches(
    server: ServerProcess, device: str, keys: Keys, tmp_path: Path
) -> None:
    bundles = {
        v: make_agent_bundle(tmp_path / f"digits-{v}.tar", keys.release, version=v, profile=PROFILE)[0]
        for v in ("1.0.0", "1.1.0")
    }
    releases = {v: publish(server, path)["release_id"] for v, path in bundles.items()}
    selector = {"device_ids": [device]}
    install = {"release_id": releases["1.0.0"], "selector": selector, "start": True}
    rid = server.api("POST", "/api/v1/rollouts", json=install)["rollout_id"]
    wait_for(lambda: rollout_state(server, rid)["state"] == "completed", timeout=90, what="1.0.0 installed")
    assert _serving(server, device) == [("digits", "1.0.0")]

    shadow = {
        "release_id": releases["1.1.0"],
        "selector": selector,
        "strategy": "shadow",
        "stages": [{"percent": 100, "soak_seconds": 8}],
        "gates": {"min_shadow_agreement": 0.9, "min_telemetry_requests": 40},
        "start": True,
    }
    sid = server.api("POST", "/api/v1/rollouts", json=shadow)["rollout_id"]

    def agreement() -> Any:
        summary = server.api("GET", "/api/v1/telemetry/summary", params={"model_name": "digits", "version": "1.0.0"})
        for group in summary["groups"]:
            for s in group["shadow"]:
                if s["compared"] >= 40:
                    return s
        return None

    reported = wait_for(agreement, timeout=90, what="shadow agreement in the telemetry summary")
    assert reported["agreement"] == 1.0 and reported["top1_agree"] == reported["compared"]
    wait_for(lambda: rollout_state(server, sid)["state"] != "running", timeout=60, what="shadow rollout end")
    status = rollout_state(server, sid)
    assert status["state"] == "completed", status["detail"]  # the agreement gate passed
    assert [(d["mode"], d["state"]) for d in status["deployments"]] == [("shadow", "committed")]
    assert _serving(server, device) == [("digits", "1.0.0")]  # no switch: the candidate only shadowed
