"""A server-ordered rollback to the release a device ran before needs no bundle download.

A real OTA server process, a real device agent process (`edgeota agent run`) and the real Mosquitto: the
device installs 1.0.0 and then 1.1.0 through rollouts; the rollout of 1.1.0 is then rolled back. The agent
kept the 1.0.0 archive, so its event log shows the rollback reusing it (`bundle_reused`) and no download
step fetching it. A kept archive changed on disk is detected (`kept_archive_mismatch`) and fetched again.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import running_agent, running_server, wait_until
from test_end_to_end import PROFILE, _roll_out, _running_version
from test_end_to_end import bundles as bundles  # the module-scoped fixture: keys and two signed bundles

from device_agent.store import read_state
from edgeota_contract.bundle import sha256_file
from edgeota_contract.provisioning import DeviceProvisioning


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text().splitlines():
        if line.startswith("{") and (entry := json.loads(line)).get("event") == name:
            found.append(entry)
    return found


def _finished(state_dir: Path, deployments: int) -> bool:
    return len(read_state(state_dir).finished) >= deployments and read_state(state_dir).deployment is None


@pytest.mark.integration
def test_a_fleet_rollback_reuses_the_kept_archive(bundles: dict[str, Any], tmp_path: Path, mqtt_broker: Any) -> None:
    db_url = f"sqlite:///{tmp_path / 'server.db'}"
    sha = {v: sha256_file(bundles[v]) for v in ("1.0.0", "1.1.0")}
    with running_server(tmp_path / "server", db_url, mqtt_broker.port, [bundles["release_pub"]]) as server:
        client = server.client()
        provisioned = client.post("/api/v1/devices", json={"hardware_profile": PROFILE, "labels": {"site": "lab"}})
        assert provisioned.status_code == 201, provisioned.text
        device_id = provisioned.json()["device_id"]
        config = tmp_path / "device" / "agent.toml"
        config.parent.mkdir()
        state_dir = tmp_path / "device" / "state"
        prov = DeviceProvisioning.model_validate(tomllib.loads(provisioned.json()["agent_toml"]))
        prov.agent.update({"state_dir": str(state_dir), "trial_seconds": 2.0, "log_level": "INFO"})
        config.write_text(prov.to_toml())
        log = config.with_suffix(".log")

        with running_agent(config) as agent:
            rollouts: dict[str, str] = {}
            for n, version in enumerate(("1.0.0", "1.1.0"), start=1):
                rollouts[version] = _roll_out(client, bundles[version], device_id)["rollout_id"]
                wait_until(lambda n=n: _finished(state_dir, n), 120, f"device on {version}", proc=agent)  # type: ignore[misc]
            wait_until(lambda: _running_version(client, device_id) == "1.1.0", 60, "server sees 1.1.0", proc=agent)
            assert {p.name for p in (state_dir / "download").iterdir()} == {f"{s}.bundle" for s in sha.values()}
            assert not _events(log, "bundle_reused")

            # The fleet halts: the server orders the device back to the release it ran before.
            rolled = client.post(f"/api/v1/rollouts/{rollouts['1.1.0']}/rollback", json={"reason": "halt"})
            assert rolled.status_code == 200, rolled.text
            wait_until(lambda: _finished(state_dir, 3), 120, "rollback finished", proc=agent)
            wait_until(lambda: _running_version(client, device_id) == "1.0.0", 60, "server sees 1.0.0", proc=agent)
            reused = _events(log, "bundle_reused")
            assert [e["sha256"] for e in reused] == [sha["1.0.0"]], reused
            state = read_state(state_dir)
            last = state.finished[-1]
            assert (last.bundle_sha256, last.state.value) == (sha["1.0.0"], "committed"), last

            # A kept archive changed on disk is never used: re-hashed, removed and downloaded again.
            kept = state_dir / "download" / f"{sha['1.1.0']}.bundle"
            data = bytearray(kept.read_bytes())
            data[len(data) // 2] ^= 0xFF
            kept.write_bytes(bytes(data))
            again = client.post(
                "/api/v1/rollouts",
                json={
                    "release_id": _release_of(client, bundles["1.1.0"]),
                    "selector": {"device_ids": [device_id]},
                    "stages": [{"percent": 100, "soak_seconds": 0}],
                    "start": True,
                },
            )
            assert again.status_code in (200, 201), again.text
            wait_until(lambda: _finished(state_dir, 4), 120, "1.1.0 again", proc=agent)
            mismatch = _events(log, "kept_archive_mismatch")
            assert len(mismatch) == 1 and mismatch[0]["sha256"] == sha["1.1.0"], mismatch
            assert mismatch[0]["found_sha256"] != sha["1.1.0"]
            assert len(_events(log, "bundle_reused")) == 1  # the changed file was not reused
            last = read_state(state_dir).finished[-1]
            assert (last.bundle_sha256, last.state.value) == (sha["1.1.0"], "committed"), last
            assert sha256_file(kept) == sha["1.1.0"]  # the fresh download is what is kept now


def _release_of(client: httpx.Client, bundle: Path) -> str:
    """The release of a bundle the server already holds (uploading it again names it: 200)."""
    upload = client.post("/api/v1/bundles", content=bundle.read_bytes())
    assert upload.status_code == 200, upload.text
    return str(upload.json()["release_id"])
