"""The update state machine as pure transitions: every path, every crash point, the bootcount."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from device_agent.update import machine
from device_agent.update.checks import HealthPolicy, HealthStats, judge_health
from device_agent.update.machine import HAPPY_PATH, NAMED_STEPS, Deployment, Step
from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState, ReasonCode, deployment_transition_allowed


def _dep() -> Deployment:
    now = datetime.now(UTC)
    a = Assignment(
        deployment_id="d1",
        device_id="dev-1",
        model_name="m",
        version="1.0.0",
        release_counter=1,
        hardware_profile="p",
        bundle_sha256="0" * 64,
        bundle_size=10,
        bundle_url="/x",
        issued_at=now,
        expires_at=now + timedelta(hours=1),
    )
    return machine.start(a, "b", "a")


def _run(
    dep: Deployment, fail_at: Step | None = None, crash_at: Step | None = None, max_boot: int = 2
) -> tuple[Deployment, list[DeploymentState]]:
    """Drive to the end; optionally fail one step, or 'crash' (reboot) once when a step is about to run."""
    reports: list[DeploymentState] = []
    crashed = False
    while not dep.done:
        if dep.step == crash_at and not crashed:
            crashed = True
            tr = machine.on_boot(dep, max_boot)
        elif dep.step == fail_at:
            tr = machine.on_failure(dep, ReasonCode.HEALTH_FAILED, "boom")
        else:
            tr = machine.on_success(dep)
        reports += [r.state for r in tr.reports]
        dep = tr.deployment
    return dep, reports


def _consistent(reports: list[DeploymentState]) -> bool:
    current = DeploymentState.NOTIFIED
    for state in reports:
        if state != current and not deployment_transition_allowed(current, state):
            return False
        current = state
    return current.terminal


def test_happy_path_reports_every_device_state_in_order() -> None:
    dep, reports = _run(_dep())
    assert dep.outcome == DeploymentState.COMMITTED
    assert [r.value for r in reports] == ["downloading", "downloaded", "verifying", "installing", "trial", "committed"]


@pytest.mark.parametrize("step", HAPPY_PATH)
def test_failure_at_each_step(step: Step) -> None:
    dep, reports = _run(_dep(), fail_at=step)
    expected = DeploymentState.FAILED if step in machine.BEFORE_SWITCH else DeploymentState.ROLLED_BACK
    assert dep.outcome == expected and dep.reason == ReasonCode.HEALTH_FAILED
    assert reports[-1] == expected and _consistent(reports)


@pytest.mark.parametrize("step", HAPPY_PATH)
def test_crash_before_each_step_resumes_to_commit(step: Step) -> None:
    dep, reports = _run(_dep(), crash_at=step)
    assert dep.outcome == DeploymentState.COMMITTED
    assert _consistent(reports)


def test_crash_loop_in_trial_rolls_back_after_max_boot_attempts() -> None:
    dep = _dep()
    while dep.step != Step.TRIAL:
        dep = machine.on_success(dep).deployment
    assert dep.boot_attempts == 1
    dep = machine.on_boot(dep, 3).deployment
    dep = machine.on_boot(dep, 3).deployment
    assert dep.step == Step.TRIAL and dep.boot_attempts == 3
    tr = machine.on_boot(dep, 3)
    assert tr.deployment.step == Step.ROLLBACK and tr.deployment.reason == ReasonCode.CRASH_LOOP
    final = machine.on_success(tr.deployment)
    assert final.deployment.done and final.reports[0].state == DeploymentState.ROLLED_BACK


def test_failing_cleanup_still_finishes() -> None:
    dep = machine.on_failure(_dep(), ReasonCode.DISK_FULL).deployment
    assert dep.step == Step.ABORT
    tr = machine.on_failure(dep, ReasonCode.INTERNAL_ERROR)
    assert tr.deployment.done and tr.reports[0].reason == ReasonCode.DISK_FULL


def test_done_deployment_cannot_move() -> None:
    dep, _ = _run(_dep())
    with pytest.raises(ValueError):
        machine.on_success(dep)
    with pytest.raises(ValueError):
        machine.on_failure(dep, ReasonCode.OK)


def test_named_steps_are_unique_strings() -> None:
    assert len({s.value for s in NAMED_STEPS}) == len(NAMED_STEPS)


@pytest.mark.parametrize(
    ("stats", "policy", "reason"),
    [
        (HealthStats(requests=20, nan_outputs=1), HealthPolicy(), ReasonCode.NAN_OUTPUT),
        (HealthStats(requests=20, errors=5), HealthPolicy(), ReasonCode.ERROR_RATE),
        (HealthStats(requests=5, errors=5), HealthPolicy(min_requests=10), None),
        (HealthStats(latencies_ms=[5.0] * 10), HealthPolicy(latency_budget_ms=1.0), ReasonCode.LATENCY_OVER_BUDGET),
        (HealthStats(latencies_ms=[50.0] * 10), HealthPolicy(baseline_ms=1.0), ReasonCode.LATENCY_OVER_BUDGET),
        (HealthStats(latencies_ms=[2.5] * 10), HealthPolicy(baseline_ms=1.0), None),
        (HealthStats(requests=100, errors=1, latencies_ms=[1.0]), HealthPolicy(latency_budget_ms=2.0), None),
    ],
)
def test_health_rules(stats: HealthStats, policy: HealthPolicy, reason: ReasonCode | None) -> None:
    verdict = judge_health(stats, policy)
    assert (verdict[0] if verdict else None) == reason
