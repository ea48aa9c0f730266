"""The fleet simulator against the real server, broker and agents: identities, a rollout, and injected faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeota.fleet.faults import FaultKind, parse_faults
from edgeota.fleet.simulator import FleetConfig, FleetSimulator
from edgeota.fleet.stack import Stack, local_stack, prepare_workdir
from ota_server.api.responses import RolloutStatus
from ota_server.client import ApiClient
from ota_server.client_plans import RolloutPlan, StagePlan

PROFILE = "x86-avx2"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = prepare_workdir(tmp_path_factory.mktemp("fleet") / "stack")
    with local_stack(workdir, "mosquitto") as running:
        yield running


@pytest.fixture(scope="module")
def release_id(stack: Stack) -> str:
    from edgeota.fleet.releases import package_release
    from packager.examples.digits import build_digits_example

    model = build_digits_example(stack.workdir / "model", arch="mlp", seed=0)
    rel = package_release(
        model.model_path,
        model.calibration_path,
        model.eval_path,
        [PROFILE],
        stack.release_key,
        stack.workdir / "bundles",
        "digits",
        "1.0.0",
        jobs=1,
    )
    with ApiClient.connect(stack.server_url, stack.admin_token) as api:
        return api.upload(rel.bundles[PROFILE]).release_id


def _config(stack: Stack, tmp_path: Path, devices: int, prefix: str, faults: str = "", **extra: Any) -> FleetConfig:
    return FleetConfig(
        devices=devices,
        profiles=[PROFILE],
        server_url=stack.server_url,
        admin_token=stack.admin_token,
        workdir=tmp_path / "fleet",
        faults=parse_faults(faults),
        prefix=prefix,
        rate_per_device=5.0,
        agent_overrides={"trial_seconds": 2.0, "trial_requests": 10},
        **extra,
    )


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _roll_out(api: ApiClient, release_id: str, prefix: str, timeout: float = 90) -> RolloutStatus:
    plan = RolloutPlan(stages=[StagePlan(percent=100)], labels={"fleet": prefix}, device_timeout_seconds=60)
    rollout = api.create_rollout(release_id, plan)
    api.start_rollout(rollout.rollout_id)
    return api.wait_rollout(rollout.rollout_id, timeout=timeout)


@pytest.mark.integration
def test_devices_get_identities_and_a_rollout_reaches_all(stack: Stack, release_id: str, tmp_path: Path) -> None:
    config = _config(stack, tmp_path, 3, "ok")
    with FleetSimulator(config) as sim, ApiClient.connect(stack.server_url, stack.admin_token) as api:
        devices = sim.provision()
        assert [d.device_id for d in devices] == ["ok-0000", "ok-0001", "ok-0002"]
        assert all((d.folder / "agent.toml").is_file() and (d.folder / "state").is_dir() for d in devices)
        sim.start()
        _wait(lambda: len([d for d in api.devices("fleet=ok") if d.online]) == 3, 30, "3 devices online")
        final = _roll_out(api, release_id, "ok")
        assert final.state == "completed"
        assert final.counts["committed"] == 3
        _wait(lambda: sim.snapshot().versions == {"1.0.0": 3}, 15, "every agent serving 1.0.0")
        _wait(lambda: sim.served("1.0.0")[1] > 0, 15, "synthetic load answered by 1.0.0")
        assert sim.snapshot().errors == 0
        assert {m.version for m in api.device("ok-0001").models} == {"1.0.0"}
    # provisioning again reuses the identities written into the folders
    again = FleetSimulator(config)
    assert [d.device_id for d in again.provision()] == ["ok-0000", "ok-0001", "ok-0002"]
    again.stop()


@pytest.mark.integration
def test_faults_network_cut_kill_mid_update_and_offline(stack: Stack, release_id: str, tmp_path: Path) -> None:
    faults = "network_cut:f-0000:after=0,duration=6;kill_mid_update:f-0001:step=verify_bundle,restart_after=1;offline:f-0002:after=0,duration=6"
    config = _config(stack, tmp_path, 3, "f", faults)
    with FleetSimulator(config) as sim, ApiClient.connect(stack.server_url, stack.admin_token) as api:
        sim.provision()
        by_id = {d.device_id: d for d in sim.devices}
        assert [f.kind for f in by_id["f-0000"].faults] == [FaultKind.NETWORK_CUT]
        assert by_id["f-0000"].proxy is not None  # its broker address is a cuttable proxy
        sim.start()
        assert not by_id["f-0002"].running  # offline from the start
        final = _roll_out(api, release_id, "f")
        assert final.state == "completed", final
        assert final.counts["committed"] == 3
        events = [(d, what) for _, d, what in sim.events]
        assert ("f-0000", "network cut") in events and ("f-0000", "network restored") in events
        assert ("f-0001", "killed at step verify_bundle") in events
        assert ("f-0002", "agent started") in events
        _wait(lambda: sim.snapshot().versions == {"1.0.0": 3}, 20, "every agent serving 1.0.0")
        killed = [s for d, s in [(e[1], e[2]) for e in sim.events] if d == "f-0001"]
        assert killed.count("agent started") == 2  # booted again on the same folder and finished the update


@pytest.mark.integration
def test_fleet_simulate_command_runs_agents_for_a_while(stack: Stack, tmp_path: Path) -> None:
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "edgeota.cli",
        "fleet",
        "simulate",
        "--devices",
        "2",
        "--profiles",
        PROFILE,
        "--server",
        stack.server_url,
        "--token",
        stack.admin_token,
        "--workdir",
        str(tmp_path / "cli"),
        "--prefix",
        "cli",
        "--duration",
        "3",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 agents running" in result.stderr
    with ApiClient.connect(stack.server_url, stack.admin_token) as api:
        seen = api.devices("fleet=cli")
    assert sorted(d.device_id for d in seen) == ["cli-0000", "cli-0001"]
    assert all(d.last_seen for d in seen)  # each agent connected and checked in


@pytest.mark.integration
def test_polling_devices_take_assignments_only_from_http_polls(stack: Stack, release_id: str, tmp_path: Path) -> None:
    config = _config(stack, tmp_path, 3, "poll", poll_seconds=1.0)
    with FleetSimulator(config) as sim, ApiClient.connect(stack.server_url, stack.admin_token) as api:
        sim.provision()
        sim.start()
        _wait(lambda: len([d for d in api.devices("fleet=poll") if d.online]) == 3, 30, "3 devices online")
        final = _roll_out(api, release_id, "poll")
        assert final.state == "completed", final
        assert final.counts["committed"] == 3
        _wait(lambda: sim.snapshot().versions == {"1.0.0": 3}, 20, "every agent serving 1.0.0")
        # Assignments pushed over MQTT are dropped by polling devices (tests/cli_and_fleet/test_poll.py), so these came by HTTP.
        assert sim.status()["polls"]["delivered"] >= 3
