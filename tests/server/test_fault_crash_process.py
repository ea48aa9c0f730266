"""``kill -9`` of a real agent process inside an update step, followed to the server's record.

Real `edgeota server run`, real Mosquitto, real `edgeota agent run` processes. The agent is killed in the
middle of a step, not at a step boundary: halfway through the download (the ``download_mid`` point), and
halfway through unpacking into the staging slot (after the first model file is written, injected by a
wrapper around the bundle unpacker). A fresh agent process then finishes the update. Afterwards the
server's status history of the deployment (its ``status_events``) is a consistent sequence ending in
``committed``, the device runs the new version, and the agent's slot holds exactly the verified files.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from device_agent.store import read_state
from device_agent.update.archives import archive_name, archives_to_keep
from edgeota_contract.bundle import sha256_file
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.states import DeploymentState, deployment_transition_allowed
from tests.agent.bundles import make_bundle, make_payload
from tests.agent.conftest import FAST_AGENT, PROFILE
from tests.conftest import Broker

from .conftest import Keys
from .procs import ServerProcess, agent_process, wait_for_agent
from .test_tuf_process import deployment, publish, running_version, start_rollout

pytestmark = pytest.mark.integration

# Run the agent with the bundle unpacker wrapped: SIGKILL once the first file is written into the slot.
UNPACK_KILLER = """
import os, runpy, signal, sys
import edgeota_contract.bundle as bundle
original = bundle._check_member
def check_then_die(reader, entry, dest):
    original(reader, entry, dest)
    if dest is not None:
        os.kill(os.getpid(), signal.SIGKILL)
bundle._check_member = check_then_die
sys.argv = ["edgeota", *sys.argv[1:]]
runpy.run_module("edgeota.cli", run_name="__main__")
"""


def _bundle(tmp_path: Path, keys: Keys, version: str) -> Path:
    """A valid bundle of about 2 MiB (a long model card), so the download and the unpack take many chunks."""
    out = tmp_path / f"digits-{version}.bundle.tar"
    payload = make_payload(seed=int(version.split(".")[1]))
    payload["model_card.md"] = b"# card\n" + b"c" * (2 << 20)
    make_bundle(out, keys.release, version=version, profile=PROFILE, payload=payload)
    return out


@contextmanager
def _agent(config: Path, point: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    args = ["agent", "run", "--config", str(config)]
    if point == "unpack_mid":
        with agent_process(config, command=[sys.executable, "-c", UNPACK_KILLER, *args]) as proc:
            yield proc
        return
    with agent_process(config, env={"EDGEOTA_AGENT_CRASH_AT": point} if point is not None else None) as proc:
        yield proc


def _server_history(db: Path, deployment_id: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT state FROM status_events WHERE deployment_id = ? ORDER BY id", (deployment_id,))
        return [str(r[0]) for r in rows]


def _assert_consistent(history: list[str]) -> None:
    """Repeats are fine (a report re-sent after the restart); going backwards or skipping ahead is not."""
    current = DeploymentState.NOTIFIED
    for raw in history:
        state = DeploymentState(raw)
        assert state == current or deployment_transition_allowed(current, state), history
        current = state
    assert current == DeploymentState.COMMITTED, history


def test_kill_9_inside_steps_then_the_server_sees_a_consistent_sequence(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker
) -> None:
    db = tmp_path / "server.db"
    proc = ServerProcess(tmp_path, f"sqlite:///{db}", keys, mqtt_broker)
    with proc.running() as server:
        device_id = f"crash-{os.getpid()}"
        toml = server.api("POST", "/api/v1/devices", json={"device_id": device_id, "hardware_profile": PROFILE})
        prov = DeviceProvisioning.model_validate(tomllib.loads(toml["agent_toml"]))
        state_dir = tmp_path / "device" / "state"
        prov.agent.update({**FAST_AGENT, "state_dir": str(state_dir), "trial_seconds": 0.5})
        config = tmp_path / "device" / "agent.toml"
        config.parent.mkdir()
        config.write_text(prov.to_toml())
        with _agent(config) as agent:
            first = start_rollout(server, publish(server, _bundle(tmp_path, keys, "1.0.0")), device_id)
            wait_for_agent(lambda: deployment(server, first).get("state") == "committed", 90, "v1 committed", agent)

        for minor, point in enumerate(("download_mid", "unpack_mid"), start=1):
            version = f"1.{minor}.0"
            rollout = start_rollout(server, publish(server, _bundle(tmp_path, keys, version)), device_id)
            with _agent(config, point) as killed:
                try:
                    killed.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"the agent was not killed at {point}")
                assert killed.returncode == -signal.SIGKILL, killed.returncode
            dep = read_state(state_dir).deployment
            assert dep is not None, f"{point}: no deployment in progress after the kill"
            if point == "download_mid":
                part = state_dir / "download" / f"{dep.assignment.bundle_sha256}.part"
                assert 0 < part.stat().st_size < dep.assignment.bundle_size  # really halfway
            else:
                slot = state_dir / "slots" / dep.target_slot
                written = sorted(p.name for p in slot.iterdir())
                assert 0 < len(written) < 4, written  # really halfway through the unpack
            with _agent(config) as agent:
                wait_for_agent(
                    lambda r=rollout: deployment(server, r).get("state") == "committed",  # type: ignore[misc]
                    90,
                    f"{version} committed after the kill at {point}",
                    agent,
                )
                wait_for_agent(lambda v=version: running_version(server, device_id) == v, 30, "check-in", agent)  # type: ignore[misc]
            deployment_id = deployment(server, rollout)["deployment_id"]
            _assert_consistent(_server_history(db, deployment_id))
            state = read_state(state_dir)
            info = state.active()
            assert info is not None and info.version == version
            folder = state_dir / "slots" / str(state.active_slot)
            assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in info.manifest.files)
            for entry in info.manifest.files:
                assert sha256_file(folder / entry.name) == entry.sha256
            # The download folder holds only the archives the agent keeps (the committed bundles), no partial file.
            kept = {archive_name(sha) for sha in archives_to_keep(state)}
            assert {p.name for p in (state_dir / "download").iterdir()} == kept
