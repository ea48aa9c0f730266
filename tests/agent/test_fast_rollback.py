"""Fast, final rollback to a known-good release.

A server-ordered rollback to a bundle this device committed before is probed briefly instead of a full
trial window (``fast_rollback``); a rollback never ends on the release it rolls back from: a crash loop
during its trial (real ``kill -9``) commits it, and a failure after its switch keeps it serving.
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
from device_agent.store import AgentState, SlotInfo, read_state
from device_agent.update import machine
from device_agent.update.machine import Step
from device_agent.update.trial import trial_settings
from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState, ReasonCode
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer


def _a(mode: str = "rollback") -> Assignment:
    from datetime import UTC, datetime, timedelta

    now = datetime.now(UTC)
    return Assignment(
        deployment_id="dep-9",
        device_id="dev-1",
        model_name="digits",
        version="1.0.0",
        release_counter=10000,
        hardware_profile="x86_64-avx2",
        bundle_sha256="b" * 64,
        bundle_size=10,
        bundle_url="/x",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        mode=mode,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ the machine, one event at a time


def test_known_good_only_for_a_rollback() -> None:
    assert machine.start(_a("rollback"), "b", "a", known_good=True).known_good
    assert not machine.start(_a("install"), "b", "a", known_good=True).known_good


def test_crash_loop_in_a_rollback_trial_commits_it() -> None:
    dep = machine.start(_a(), "b", "a").model_copy(update={"step": Step.TRIAL, "boot_attempts": 2})
    t = machine.on_boot(dep, max_boot_attempts=2)
    assert t.deployment.step == Step.COMMIT and t.deployment.outcome is None
    done = machine.on_success(t.deployment)
    assert done.deployment.outcome == DeploymentState.COMMITTED
    # an install still rolls back on a crash loop
    inst = machine.start(_a("install"), "b", "a").model_copy(update={"step": Step.TRIAL, "boot_attempts": 2})
    rolled = machine.on_boot(inst, max_boot_attempts=2).deployment
    assert rolled.step == Step.ROLLBACK and rolled.reason == ReasonCode.CRASH_LOOP


def test_a_rollback_failing_after_its_switch_keeps_serving_its_bundle() -> None:
    dep = machine.start(_a(), "b", "a").model_copy(update={"step": Step.TRIAL})
    t = machine.on_failure(dep, ReasonCode.ERROR_RATE, "bad")
    assert t.deployment.step == Step.ABORT and t.deployment.outcome == DeploymentState.FAILED


def test_trial_settings_shorten_only_a_known_good_fast_rollback(
    tmp_path: Path, keys: Keys, server: BundleServer
) -> None:
    settings = AgentConfig.load(write_config(tmp_path, keys, server.url, trial_seconds=30.0)).settings
    short = trial_settings(settings, known_good=True)
    assert short.trial_seconds == settings.rollback_probe_seconds and short.trial_requests == 0
    assert trial_settings(settings, known_good=False) is settings
    slow = settings.model_copy(update={"fast_rollback": False})
    assert trial_settings(slow, known_good=True) is slow


def test_known_good_is_a_committed_bundle_or_an_idle_slot(tmp_path: Path) -> None:
    state = AgentState()
    assert not state.known_good("c" * 64)
    state.remember_committed("c" * 64)
    assert state.known_good("c" * 64)
    digest_only: dict[str, Any] = {"bundle_sha256": "d" * 64}
    info = SlotInfo.model_construct(**digest_only)  # only the digest is read
    state.slots["a"] = info
    assert state.known_good("d" * 64)
    state.slots = {"a": None, "b": None, "shadow": info}
    assert not state.known_good("d" * 64)  # a shadow candidate never served


# ------------------------------------------------------------------ a real agent


def _v1_then_v2(agent: Agent, keys: Keys, publish_bundle: Callable[..., BundleRef]) -> tuple[BundleRef, BundleRef]:
    v1, v2 = publish_bundle("1.0.0"), publish_bundle("1.1.0", seed=5)
    agent.handle_command(signed(assignment(v1, deployment_id="dep-1"), keys.server))
    assert agent.wait_idle(30)
    agent.handle_command(signed(assignment(v2, deployment_id="dep-2"), keys.server))
    assert agent.wait_idle(30)
    assert agent.state.active() is not None and agent.state.active().version == "1.1.0"  # type: ignore[union-attr]
    return v1, v2


@pytest.mark.parametrize("fast", [True, False])
def test_a_rollback_to_a_committed_bundle_skips_the_full_trial(
    fast: bool, tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    # installs get a 0.3 s trial here; the rollback would get 120 s unless it is known good
    config = write_config(tmp_path, keys, server.url, fast_rollback=fast, rollback_probe_seconds=0.2)
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        v1, _ = _v1_then_v2(agent, keys, publish_bundle)
    config = write_config(tmp_path, keys, server.url, fast_rollback=fast, rollback_probe_seconds=0.2, trial_seconds=120)
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        agent.handle_command(signed(assignment(v1, deployment_id="dep-3", mode="rollback"), keys.server))
        if fast:
            assert agent.wait_idle(30)  # would take 120 s with a full trial
            final = agent.state.finished_by_id("dep-3")
            assert final is not None and final.state == DeploymentState.COMMITTED
            assert agent.runtime.current is not None and agent.runtime.current.manifest.version == "1.0.0"
        else:
            deadline = time.monotonic() + 30
            while (dep := agent.state.deployment) is None or dep.step != Step.TRIAL:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert dep.known_good is False
            time.sleep(1.0)
            assert agent.state.deployment is not None and agent.state.deployment.step == Step.TRIAL


def _apply(config: Path, command: Path | None, crash_at: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    if crash_at:
        env["EDGEOTA_AGENT_CRASH_AT"] = crash_at
    args = [sys.executable, "-m", "edgeota.cli", "agent", "apply", "--config", str(config), "--timeout", "60"]
    if command is not None:
        args.append(str(command))
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.parametrize("fast", [True, False])
def test_kill_9_twice_in_a_rollback_trial_never_returns_to_the_bad_release(
    fast: bool, tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    """The soak's case: an agent killed during the trial of a server-ordered rollback, again and again."""
    config = write_config(tmp_path, keys, server.url, max_boot_attempts=2, fast_rollback=fast)
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        v1, _ = _v1_then_v2(agent, keys, publish_bundle)
    command = tmp_path / "rollback.json"
    command.write_bytes(signed(assignment(v1, deployment_id="dep-3", mode="rollback"), keys.server))
    runs = [_apply(config, command, "trial")]
    runs += [_apply(config, None, "trial") for _ in range(2)]
    assert [r.returncode for r in runs] == [-9, -9, 0], runs[-1].stderr[-2000:]
    state = read_state(tmp_path / "state")
    final = state.finished_by_id("dep-3")
    assert final is not None and final.state == DeploymentState.COMMITTED, final
    active = state.active()
    assert active is not None and active.version == "1.0.0" and active.bundle_sha256 == v1.sha256
    reports = [r["state"] for r in state.outbox if r["deployment_id"] == "dep-3"]
    assert "rolled_back" not in reports and reports[-1] == "committed", reports
    assert v1.sha256 in state.committed_bundles


def test_a_rollback_whose_trial_fails_keeps_its_bundle(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    """A rollback to a release never committed here, whose trial fails (latency budget): reported failed, and
    the device stays on it rather than on the release the server ordered it away from."""
    config = write_config(tmp_path, keys, server.url)
    with Agent(AgentConfig.load(config), connect=False, session_cache=SessionCache()) as agent:
        _v1_then_v2(agent, keys, publish_bundle)
        old = publish_bundle("1.0.0", seed=3, metrics={"latency_budget_ms": 1e-6})
        agent.handle_command(signed(assignment(old, deployment_id="dep-3", mode="rollback"), keys.server))
        assert agent.wait_idle(30)
        final = agent.state.finished_by_id("dep-3")
        assert final is not None and final.state == DeploymentState.FAILED, final
        assert final.reason == ReasonCode.LATENCY_OVER_BUDGET
        current = agent.runtime.current
        assert current is not None and current.bundle_sha256 == old.sha256
        assert agent.state.active() is not None and agent.state.active().bundle_sha256 == old.sha256  # type: ignore[union-attr]
