"""``command_transport = "http_poll"`` end to end: a real ``edgeota agent run`` process takes its assignment from
polls of a real ``edgeota server run`` (its device token), installs and commits it, and reports over real
Mosquitto. In process, the same shows that the agent's own poller delivered the assignment."""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import SigningKey, write_keypair
from tests.agent.bundles import make_bundle
from tests.agent.conftest import FAST_AGENT, PROFILE
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker
from tests.server.conftest import Keys as ServerKeys
from tests.server.procs import ServerProcess, agent_process, wait_for_agent

pytestmark = pytest.mark.integration


@pytest.fixture
def release() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def server(tmp_path: Path, mqtt_broker: Broker, release: SigningKey) -> Iterator[ServerProcess]:
    _, release_pub = write_keypair(tmp_path / "keys" / "release.pem", release)
    proc = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'server.db'}", ServerKeys(release, release_pub), mqtt_broker)
    with proc.running():
        yield proc


@pytest.fixture
def device(server: ServerProcess, tmp_path: Path, mqtt_broker: Broker) -> Iterator[tuple[str, Path]]:
    """``(device_id, agent.toml)`` of a polling device; afterwards its retained presence is cleared from the broker."""
    device_id, config = provision_polling_device(server, tmp_path / "device")
    yield device_id, config
    Recorder(mqtt_broker.host, mqtt_broker.port, device_id).close()  # close() clears the retained presence


def provision_polling_device(server: ServerProcess, folder: Path) -> tuple[str, Path]:
    """A device provisioned by the server (so it holds the server's keys and TUF root), set to poll every 0.5 s."""
    device_id = f"poll-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    toml = server.api("POST", "/api/v1/devices", json={"device_id": device_id, "hardware_profile": PROFILE})
    prov = DeviceProvisioning.model_validate(tomllib.loads(toml["agent_toml"]))
    prov.agent.update(
        {
            **FAST_AGENT,
            "state_dir": str(folder / "state"),
            "trial_seconds": 1.0,
            "command_transport": "http_poll",
            "command_poll_seconds": 0.5,
        }
    )
    config = folder / "agent.toml"
    folder.mkdir(parents=True)
    config.write_text(prov.to_toml())
    return device_id, config


def roll_out(server: ServerProcess, bundle: Path, device_id: str) -> Callable[[], dict[str, Any]]:
    """Upload ``bundle`` and start a one-stage rollout to ``device_id``; returns a reader of its deployment."""
    release_id = server.api(
        "POST", "/api/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )["release_id"]
    rollout = server.api(
        "POST",
        "/api/v1/rollouts",
        json={
            "release_id": release_id,
            "selector": {"device_ids": [device_id]},
            "stages": [{"percent": 100, "soak_seconds": 0}],
            "on_failure": "pause",
            "start": True,
        },
    )

    def deployment() -> dict[str, Any]:
        deps = server.api("GET", f"/api/v1/rollouts/{rollout['rollout_id']}")["deployments"]
        return dict(deps[0]) if deps else {}

    return deployment


def finished(deployment: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    dep = deployment()
    return dep if dep.get("state") in ("committed", "failed", "rolled_back") else None


def test_polling_agent_process_installs_and_commits_a_release(
    tmp_path: Path, server: ServerProcess, release: SigningKey, device: tuple[str, Path]
) -> None:
    bundle, _ = make_bundle(tmp_path / "v1.bundle.tar", release, version="1.0.0")
    device_id, config = device
    log = config.with_suffix(".log")
    polled_before = server.api("GET", "/api/v1/metrics").get("commands_polled", 0)
    with agent_process(config) as agent:
        deployment = roll_out(server, bundle, device_id)
        dep = wait_for_agent(lambda: finished(deployment), 90, "the deployment to finish", agent, log)
        assert dep["state"] == "committed", dep  # known to the server only through the agent's MQTT reports
        models = server.api("GET", f"/api/v1/devices/{device_id}").get("models") or []
        assert [(m["model_name"], m["version"]) for m in models] == [("digits", "1.0.0")]
        # The assignment reached the agent by polling: the server served it to a poll of this device.
        assert server.api("GET", "/api/v1/metrics").get("commands_polled", 0) > polled_before
    assert agent.returncode == 0, log.read_text()[-3000:]  # SIGTERM: a clean shutdown


def test_polling_agent_acts_on_what_its_poller_delivered(
    tmp_path: Path, server: ServerProcess, release: SigningKey, device: tuple[str, Path]
) -> None:
    """The same in process, to look inside: the agent's transport is the polled composition, and its own
    poller delivered the assignment (those pushed over MQTT are dropped, tests/agent/test_transport.py)."""
    from device_agent.agent import Agent
    from device_agent.settings import AgentConfig
    from device_agent.transport.poll import HttpCommandPoller, PolledTransport

    bundle, _ = make_bundle(tmp_path / "v1.bundle.tar", release, version="1.0.0")
    device_id, config = device
    with Agent(AgentConfig.load(config)) as agent:
        transport = agent.transport
        assert isinstance(transport, PolledTransport) and isinstance(transport.commands, HttpCommandPoller)
        assert transport.wait_connected(15)  # reports: MQTT
        deployment = roll_out(server, bundle, device_id)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and finished(deployment) is None:
            time.sleep(0.2)
        assert (finished(deployment) or {}).get("state") == "committed", deployment()
        assert transport.commands.delivered >= 1 and transport.commands.failed == 0
        assert agent.state.last_deployment is not None and agent.state.last_deployment.version == "1.0.0"
