"""A crash at every named step of an update, in-process (simulated) and as a real ``kill -9``.

After the restart exactly one complete, verified model must be active, the deployment must reach a
terminal state, and the status reports must form a consistent sequence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from device_agent.store import read_state
from device_agent.update.machine import HAPPY_PATH, Step
from edgeota_contract.bundle import sha256_file
from edgeota_contract.states import DeploymentState, deployment_transition_allowed
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

# (crash point, kind of update, expected outcome, version serving afterwards)
CASES: list[tuple[str, str, DeploymentState, str]] = [
    *[(step.value, "good", DeploymentState.COMMITTED, "1.1.0") for step in HAPPY_PATH],
    ("download_mid", "good", DeploymentState.COMMITTED, "1.1.0"),
    (Step.ABORT.value, "bad", DeploymentState.FAILED, "1.0.0"),
    (Step.ROLLBACK.value, "slow", DeploymentState.ROLLED_BACK, "1.0.0"),
]


class SimulatedCrash(BaseException):
    pass


def _candidate(kind: str, publish_bundle: Callable[..., BundleRef], point: str = "") -> BundleRef:
    if kind == "bad":
        return publish_bundle("1.1.0", variant="wrong_vectors")
    if kind == "slow":
        return publish_bundle("1.1.0", metrics={"latency_budget_ms": 1e-6})
    # served in small pieces so a crash in the middle of the download really happens mid-way
    return publish_bundle("1.1.0", seed=5, mode="chunked" if point == "download_mid" else "ok")


def _install_v1(config: Path, keys: Keys, publish_bundle: Callable[..., BundleRef], cache: SessionCache) -> None:
    with Agent(AgentConfig.load(config), connect=False, session_cache=cache) as agent:
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), deployment_id="dep-1"), keys.server))
        assert agent.wait_idle(30)
        assert agent.state.active() is not None


def _assert_consistent(state_dir: Path, outcome: DeploymentState, version: str) -> None:
    state = read_state(state_dir)
    assert state.deployment is None, state.deployment
    final = state.finished_by_id("dep-2")
    assert final is not None and final.state == outcome, final
    info = state.active()
    assert info is not None and info.version == version
    assert state.active_slot is not None
    folder = state_dir / "slots" / state.active_slot
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in info.manifest.files)
    for entry in info.manifest.files:
        assert sha256_file(folder / entry.name) == entry.sha256
    other = state.inactive_slot()
    if state.slots[other] is None:
        assert not (state_dir / "slots" / other).exists()
    kept = {f"{sha}.bundle" for sha in state.committed_bundles[-2:]}  # the archives kept for a rollback
    assert {p.name for p in (state_dir / "download").iterdir()} == kept
    seq = [DeploymentState(r["state"]) for r in state.outbox if r["deployment_id"] == "dep-2"]
    current = DeploymentState.NOTIFIED
    for s in seq:  # duplicates are fine (re-sent after a restart); going backwards is not
        assert s == current or deployment_transition_allowed(current, s), seq
        current = s
    assert current == outcome, seq


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize(("point", "kind", "outcome", "version"), CASES)
def test_simulated_crash_at_every_step(
    point: str,
    kind: str,
    outcome: DeploymentState,
    version: str,
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    config = write_config(tmp_path, keys, server.url)
    cache = SessionCache()
    _install_v1(config, keys, publish_bundle, cache)
    candidate = _candidate(kind, publish_bundle, point)
    hit: list[str] = []

    def hook(name: str) -> None:
        if name == point and not hit:
            hit.append(name)
            raise SimulatedCrash(name)

    crashed = Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache(), crash_hook=hook)
    crashed.start()
    crashed.handle_command(signed(assignment(candidate, deployment_id="dep-2"), keys.server))
    deadline = time.monotonic() + 30
    while not hit and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hit == [point]
    crashed.stop()
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        assert agent.wait_idle(30)
        current = agent.runtime.current
        assert current is not None and current.manifest.version == version, agent.state.finished[-1]
    _assert_consistent(tmp_path / "state", outcome, version)


def _apply(config: Path, command: Path | None, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    if crash_at:
        env["EDGEOTA_AGENT_CRASH_AT"] = crash_at
    args = [sys.executable, "-m", "edgeota.cli", "agent", "apply", "--config", str(config), "--timeout", "60"]
    if command is not None:
        args.append(str(command))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize(("point", "kind", "outcome", "version"), CASES)
def test_kill_9_at_every_step(
    point: str,
    kind: str,
    outcome: DeploymentState,
    version: str,
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    config = write_config(tmp_path, keys, server.url)
    _install_v1(config, keys, publish_bundle, SessionCache())
    command = tmp_path / "assign.json"
    bundle = _candidate(kind, publish_bundle, point)
    command.write_bytes(signed(assignment(bundle, deployment_id="dep-2"), keys.server))
    killed = _apply(config, command, point)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert '"crash_injected"' in killed.stderr
    restarted = _apply(config, None, None)
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    _assert_consistent(tmp_path / "state", outcome, version)
    if point == "download_mid":  # the restarted agent resumed the download with Range
        starts = [int(r["range"][6:].split("-")[0]) for r in server.requests if r["path"] == bundle.url]
        assert starts[0] == 0 and starts[-1] > bundle.size // 2 - 4096, starts


@pytest.mark.integration
def test_crash_loop_in_trial_rolls_back(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    config = write_config(tmp_path, keys, server.url, max_boot_attempts=2)
    _install_v1(config, keys, publish_bundle, SessionCache())
    command = tmp_path / "assign.json"
    command.write_bytes(signed(assignment(publish_bundle("1.1.0", seed=5), deployment_id="dep-2"), keys.server))
    runs: list[Any] = [_apply(config, command, "trial")]
    runs += [_apply(config, None, "trial") for _ in range(2)]
    assert [r.returncode for r in runs] == [-9, -9, 0], runs[-1].stderr[-2000:]
    state = read_state(tmp_path / "state")
    final = state.finished_by_id("dep-2")
    assert final is not None and final.state == DeploymentState.ROLLED_BACK and final.reason == "crash_loop"
    _assert_consistent(tmp_path / "state", DeploymentState.ROLLED_BACK, "1.0.0")
