"""End to end with TUF on: a real `edgeota server run`, real Mosquitto and a real `edgeota agent run` process
provisioned by the server (so it holds the server's TUF root). A rollout installs through the repository
check; then, with the repository's timestamp expired, the next rollout is refused before download with the
reason reported to the server, and the old model keeps serving."""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_agent.store import read_state
from device_agent.update.archives import archive_name, archives_to_keep
from edgeota_contract.provisioning import DeviceProvisioning
from ota_server.tuf_repo import TufRepository
from tests.agent.bundles import make_bundle
from tests.agent.conftest import FAST_AGENT, PROFILE
from tests.conftest import Broker

from .conftest import Keys
from .procs import ServerProcess, agent_process, wait_for_agent

pytestmark = pytest.mark.integration


def publish(server: ServerProcess, bundle: Path) -> str:
    body = server.api(
        "POST", "/api/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )
    return str(body["release_id"])


def start_rollout(server: ServerProcess, release_id: str, device_id: str) -> str:
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
    return str(rollout["rollout_id"])


def deployment(server: ServerProcess, rollout_id: str) -> dict[str, Any]:
    deps = server.api("GET", f"/api/v1/rollouts/{rollout_id}")["deployments"]
    return dict(deps[0]) if deps else {}


def running_version(server: ServerProcess, device_id: str) -> str | None:
    for model in server.api("GET", f"/api/v1/devices/{device_id}").get("models") or []:
        if model.get("model_name") == "digits":
            return str(model.get("version"))
    return None


def test_agent_installs_through_tuf_and_refuses_expired_metadata(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker
) -> None:
    sqlite = f"sqlite:///{tmp_path / 'server.db'}"
    v1, _ = make_bundle(tmp_path / "v1.bundle.tar", keys.release, version="1.0.0")
    v2, _ = make_bundle(tmp_path / "v2.bundle.tar", keys.release, version="1.1.0", seed=3)
    proc = ServerProcess(tmp_path, sqlite, keys, mqtt_broker)
    proc.env["EDGEOTA_SERVER_TUF_REFRESH_SECONDS"] = "3600"  # its re-signing thread must not repair the staleness
    with proc.running() as server:
        toml = server.api("POST", "/api/v1/devices", json={"device_id": "tuf-dev", "hardware_profile": PROFILE})
        prov = DeviceProvisioning.model_validate(tomllib.loads(toml["agent_toml"]))
        assert prov.trust.tuf_root is not None  # provisioning turns the TUF check on by default
        state = tmp_path / "device" / "state"
        prov.agent.update({**FAST_AGENT, "state_dir": str(state), "trial_seconds": 1.0, "download_retries": 1})
        config = tmp_path / "device" / "agent.toml"
        config.parent.mkdir()
        config.write_text(prov.to_toml())

        with agent_process(config) as agent:
            first = start_rollout(server, publish(server, v1), "tuf-dev")
            wait_for_agent(lambda: deployment(server, first).get("state") == "committed", 90, "v1 committed", agent)
            assert (state / "tuf" / "timestamp.json").is_file()  # the agent refreshed the repository
            assert running_version(server, "tuf-dev") == "1.0.0"

            # The server stops re-signing: its repository's newest metadata was signed two days ago.
            repo = TufRepository(tmp_path / "server-data" / "tuf")
            release = publish(server, v2)  # v2 becomes a target on upload ...
            repo.add_bundles([("00" * 32, 1, {})], now=datetime.now(UTC) - timedelta(days=2))  # ... then goes stale
            second = start_rollout(server, release, "tuf-dev")
            dep = wait_for_agent(
                lambda: (d := deployment(server, second)).get("state") in ("failed", "committed") and d,
                90,
                "v2 finished",
                agent,
            )
            assert (dep["state"], dep["reason"]) == ("failed", "repository_metadata_expired"), dep
            assert running_version(server, "tuf-dev") == "1.0.0"
            # Nothing of the refused v2 stays: only the archives the agent keeps of what it committed (v1).
            kept = {archive_name(sha) for sha in archives_to_keep(read_state(state))}
            assert {p.name for p in (state / "download").glob("*.bundle")} <= kept
            assert archive_name(dep["bundle_sha256"]) not in kept
