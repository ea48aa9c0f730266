"""Kept bundle archives: a server-ordered rollback to the release a device ran before needs no download.

The agent keeps the archives of its last two committed bundles (``keep_bundle_archives``), prunes every
other file in its download folder, and hashes a kept archive again before reusing it: one changed on disk
is removed and downloaded again. The light emulator models the same reuse.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from device_agent.store import AgentState, SlotInfo, read_state
from device_agent.update.archives import archives_to_keep, matches, prune
from edgeota.emulator.device import EmulatedDevice
from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.states import DeploymentState
from tests.agent.conftest import PROFILE, TOKEN, BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

V0, V1, V2, V3 = ("0" * 64, "1" * 64, "2" * 64, "3" * 64)


# ------------------------------------------------------------------ the policy, as plain functions


def _slot(sha: str) -> SlotInfo:
    fields: dict[str, Any] = {"bundle_sha256": sha}
    return SlotInfo.model_construct(**fields)  # only the digest is read


def test_the_last_two_committed_bundles_are_kept() -> None:
    state = AgentState()
    assert archives_to_keep(state) == ()
    assert archives_to_keep(state, committing=V0) == (V0,)
    for sha in (V0, V1):
        state.remember_committed(sha)
    assert archives_to_keep(state) == (V0, V1)
    assert archives_to_keep(state, committing=V2) == (V1, V2)  # an install: the new one and the one it replaced
    state.remember_committed(V2)
    assert archives_to_keep(state, committing=V1) == (V2, V1)  # a rollback to v1: v1 and the release before


def test_state_without_a_commit_history_keeps_the_slot_bundles() -> None:
    state = AgentState()
    state.slots["a"], state.slots["b"], state.slots["shadow"] = _slot(V0), _slot(V1), _slot(V2)
    assert set(archives_to_keep(state)) == {V0, V1}  # never a shadow candidate
    state.slots["a"], state.slots["b"] = _slot(V0), None
    assert archives_to_keep(state, committing=V3) == (V0, V3)


def test_prune_leaves_only_the_kept_archives(tmp_path: Path) -> None:
    folder = tmp_path / "download"
    assert prune(folder, [V1]) == []  # no folder yet
    folder.mkdir()
    for name in (f"{V0}.bundle", f"{V1}.bundle", f"{V2}.bundle", f"{V2}.part", f"{V3}.part", "stray"):
        (folder / name).write_bytes(b"x")
    removed = prune(folder, [V1, V2])
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{V1}.bundle", f"{V2}.bundle", f"{V2}.part"])
    assert sorted(removed) == sorted([f"{V0}.bundle", f"{V3}.part", "stray"])
    assert prune(folder, []) and not any(folder.iterdir())


def test_a_kept_archive_is_hashed_again(tmp_path: Path) -> None:
    import hashlib

    path = tmp_path / "x.bundle"
    path.write_bytes(b"bundle bytes")
    sha = hashlib.sha256(b"bundle bytes").hexdigest()
    assert matches(path, sha, 12) == (True, sha)
    path.write_bytes(b"bundle bytez")  # same size, other bytes
    ok, found = matches(path, sha, 12)
    assert not ok and found == hashlib.sha256(b"bundle bytez").hexdigest()
    assert matches(path, sha, 13) == (False, "")  # another size: not even read


# ------------------------------------------------------------------ a real agent in this process


def _gets(server: BundleServer, bundle: BundleRef) -> int:
    return sum(1 for r in server.requests if r["path"] == bundle.url)


def _archives(state_dir: Path) -> set[str]:
    return {p.name for p in (state_dir / "download").iterdir()}


def _deploy(agent: Agent, keys: Keys, bundle: BundleRef, dep: str, mode: str = "install") -> None:
    agent.handle_command(signed(assignment(bundle, deployment_id=dep, mode=mode), keys.server))
    assert agent.wait_idle(30)
    final = agent.state.finished_by_id(dep)
    assert final is not None and final.state == DeploymentState.COMMITTED, final


def test_agent_keeps_two_archives_and_rolls_back_without_a_download(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    v1, v2, v3 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5), publish_bundle("1.2.0", seed=6)
    state_dir = tmp_path / "state"
    with Agent(AgentConfig.load(write_config(tmp_path, keys, server.url)), connect=False) as agent:
        _deploy(agent, keys, v1, "dep-1")
        assert _archives(state_dir) == {f"{v1.sha256}.bundle"}
        _deploy(agent, keys, v2, "dep-2")
        _deploy(agent, keys, v3, "dep-3")
        assert _archives(state_dir) == {f"{v2.sha256}.bundle", f"{v3.sha256}.bundle"}  # v1 pruned
        _deploy(agent, keys, v2, "dep-4", mode="rollback")
        assert agent.runtime.current is not None and agent.runtime.current.bundle_sha256 == v2.sha256
        assert _archives(state_dir) == {f"{v2.sha256}.bundle", f"{v3.sha256}.bundle"}
    assert [_gets(server, b) for b in (v1, v2, v3)] == [1, 1, 1]  # the rollback made no request
    # a restart (start-up repair) spares the kept archives
    with Agent(AgentConfig.load(write_config(tmp_path, keys, server.url)), connect=False):
        assert _archives(state_dir) == {f"{v2.sha256}.bundle", f"{v3.sha256}.bundle"}


def test_keeping_off_removes_every_archive_on_commit(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    v1, v2 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5)
    config = write_config(tmp_path, keys, server.url, keep_bundle_archives=False)
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        _deploy(agent, keys, v1, "dep-1")
        _deploy(agent, keys, v2, "dep-2")
        assert _archives(tmp_path / "state") == set()
        _deploy(agent, keys, v1, "dep-3", mode="rollback")
    assert _gets(server, v1) == 2


def test_kept_archives_give_way_when_an_update_needs_their_space(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    v1, v2, v3 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5), publish_bundle("1.2.0", seed=6)
    download = tmp_path / "state" / "download"

    def free(_path: Path) -> int:  # room for an update only once the two kept archives are gone
        kept = len(list(download.glob("*.bundle"))) if download.is_dir() else 0
        return v3.size if kept >= 2 else 10 * v3.size

    config = AgentConfig.load(write_config(tmp_path, keys, server.url))
    with Agent(config, connect=False, free_space=free) as agent:
        _deploy(agent, keys, v1, "dep-1")
        _deploy(agent, keys, v2, "dep-2")
        assert len(_archives(tmp_path / "state")) == 2
        _deploy(agent, keys, v3, "dep-3")  # needs the kept archives' room: they are dropped, the update goes on
        assert _archives(tmp_path / "state") == {f"{v3.sha256}.bundle"}


# ------------------------------------------------------------------ a real agent process (`edgeota agent apply`)


def _apply(config: Path, command: Path) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    args = [sys.executable, "-m", "edgeota.cli", "agent", "apply", "--config", str(config), "--timeout", "60"]
    run = subprocess.run([*args, str(command)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    events = [json.loads(line) for line in run.stderr.splitlines() if line.startswith("{")]
    return events, run


def _named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name]


@pytest.mark.integration
def test_agent_process_rolls_back_from_its_kept_archive_and_refetches_a_tampered_one(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    v1, v2 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5)
    config = write_config(tmp_path, keys, server.url, log_level="INFO")  # the events are the proof

    def command(bundle: BundleRef, dep: str, mode: str) -> Path:
        path = tmp_path / f"{dep}.json"
        path.write_bytes(signed(assignment(bundle, deployment_id=dep, mode=mode), keys.server))
        return path

    _apply(config, command(v1, "dep-1", "install"))
    _apply(config, command(v2, "dep-2", "install"))
    assert (_gets(server, v1), _gets(server, v2)) == (1, 1)

    # the fleet halts: the server orders the device back to the release it ran before
    events, _ = _apply(config, command(v1, "dep-3", "rollback"))
    assert _gets(server, v1) == 1  # the server saw no second request for v1
    reused = _named(events, "bundle_reused")
    assert [e["sha256"] for e in reused] == [v1.sha256], events
    state = read_state(tmp_path / "state")
    final = state.finished_by_id("dep-3")
    assert final is not None and final.state == DeploymentState.COMMITTED
    assert state.active() is not None and state.active().bundle_sha256 == v1.sha256  # type: ignore[union-attr]

    # a kept archive changed on disk (same size) is detected, removed and downloaded again
    kept = tmp_path / "state" / "download" / f"{v2.sha256}.bundle"
    data = bytearray(kept.read_bytes())
    data[len(data) // 2] ^= 0xFF
    kept.write_bytes(bytes(data))
    events, _ = _apply(config, command(v2, "dep-4", "install"))
    mismatch = _named(events, "kept_archive_mismatch")
    assert len(mismatch) == 1 and mismatch[0]["sha256"] == v2.sha256 and mismatch[0]["found_sha256"] != v2.sha256
    assert not _named(events, "bundle_reused")
    assert _gets(server, v2) == 2
    state = read_state(tmp_path / "state")
    final = state.finished_by_id("dep-4")
    assert final is not None and final.state == DeploymentState.COMMITTED, final
    assert kept.read_bytes() == v2.path.read_bytes()  # the re-downloaded archive is kept in its place


# ------------------------------------------------------------------ the light emulator models the same


def test_emulated_device_reuses_the_archives_it_keeps(
    keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    v1, v2, v3 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5), publish_bundle("1.2.0", seed=6)
    prov = DeviceProvisioning.model_validate(
        {
            "device": {"id": "dev-1", "hardware_profile": PROFILE},
            "server": {"url": server.url, "token": TOKEN},
            "mqtt": {"host": "127.0.0.1", "port": 1883},
            "trust": {
                "release_keys": [keys.release.public_pem().decode()],
                "server_keys": [keys.server.public_pem().decode()],
            },
        }
    )
    with httpx.Client(timeout=30) as http:
        device = EmulatedDevice(prov, http, lambda _key, fn: fn())  # never connected: reports stay unacked
        steps = [(v1, "install"), (v2, "install"), (v1, "rollback"), (v3, "install"), (v2, "rollback")]
        for n, (bundle, mode) in enumerate(steps):
            device.install(assignment(bundle, deployment_id=f"dep-{n}", mode=mode))
    c = device.counters
    assert (c.committed, c.failed, c.downloads, c.reused) == (5, 0, 4, 1), c
    assert [_gets(server, b) for b in (v1, v2, v3)] == [1, 2, 1]  # v2 was no longer kept when v3 came after v1
    assert device.models["digits"].bundle_sha256 == v2.sha256
    fleet = EmulatedFleet(EmulatorConfig(devices=1, server_url=server.url, admin_token="unused"))
    try:
        fleet.devices.append(device)
        assert fleet.snapshot().reused == 1
    finally:
        fleet.http.close()
