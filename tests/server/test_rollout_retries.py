"""Per-device retries in the pure rollout state machine (plain events, no database)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.rollout import engine_logic as el
from ota_server.rollout.plan import Gates, Plan, Stage

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEVICES = ("a", "b", "c", "d")
GATES = Gates(min_devices=1, max_failure_rate=0.0, min_count_for_failure_rate=1, device_timeout_seconds=300)


def plan(max_retries: int, backoff: float = 10.0, gates: Gates = GATES) -> Plan:
    return Plan((Stage(percent=100),), gates, max_retries=max_retries, retry_backoff_seconds=backoff)


def view(p: Plan, deployments: dict[str, el.DeploymentView]) -> el.RolloutView:
    return el.RolloutView("r1", RolloutState.RUNNING, p, DEVICES, 0, T0, None, frozenset(), deployments)


def dep(
    device: str, state: DS, attempt: int = 1, reason: ReasonCode = ReasonCode.OK, at: datetime = T0
) -> el.DeploymentView:
    return el.DeploymentView(device, 0, state, at, attempt, reason)


def committed_others(*skip: str) -> dict[str, el.DeploymentView]:
    return {d: dep(d, DS.COMMITTED) for d in DEVICES if d not in skip}


def test_without_retries_a_download_failure_is_final_and_trips_the_gate() -> None:
    d = {**committed_others("a"), "a": dep("a", DS.FAILED, reason=ReasonCode.DOWNLOAD_FAILED)}
    effects = el.decide(view(plan(0), d), T0 + timedelta(seconds=60))
    assert isinstance(effects[-1], el.SetState) and effects[-1].state == RolloutState.ROLLED_BACK


def test_transient_failure_waits_for_backoff_then_retries_without_counting_as_failed() -> None:
    d = {**committed_others("a"), "a": dep("a", DS.FAILED, reason=ReasonCode.DOWNLOAD_FAILED)}
    p = plan(2, backoff=10)
    assert el.count(d, p.max_retries).failed == 0 and el.count(d, p.max_retries).in_progress == 1
    assert el.decide(view(p, d), T0 + timedelta(seconds=9)) == []  # backoff: the stage waits
    assert el.decide(view(p, d), T0 + timedelta(seconds=10)) == [el.Retry(("a",))]


def test_backoff_doubles_per_attempt_and_the_last_attempt_is_final() -> None:
    p = plan(2, backoff=10)
    second = {**committed_others("a"), "a": dep("a", DS.FAILED, 2, ReasonCode.DOWNLOAD_TIMEOUT)}
    assert el.decide(view(p, second), T0 + timedelta(seconds=19)) == []
    assert el.decide(view(p, second), T0 + timedelta(seconds=20)) == [el.Retry(("a",))]
    third = {**committed_others("a"), "a": dep("a", DS.FAILED, 3, ReasonCode.DISK_FULL)}
    effects = el.decide(view(p, third), T0 + timedelta(days=1))
    assert el.count(third, p.max_retries).failed == 1
    assert isinstance(effects[-1], el.SetState) and effects[-1].reason == ReasonCode.GATE_FAILED


def test_bad_model_and_health_failures_are_never_retried() -> None:
    p = plan(3, backoff=0)
    for state, reason in (
        (DS.FAILED, ReasonCode.SMOKE_TEST_FAILED),
        (DS.FAILED, ReasonCode.SIGNATURE_INVALID),
        (DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED),
        (DS.ROLLED_BACK, ReasonCode.DOWNLOAD_FAILED),  # rolled back: the model ran and was undone
        (DS.FAILED, ReasonCode.CANCELLED),
    ):
        d = {**committed_others("a"), "a": dep("a", state, reason=reason)}
        effects = el.decide(view(p, d), T0 + timedelta(seconds=60))
        assert not any(isinstance(e, el.Retry) for e in effects), reason
        assert isinstance(effects[-1], el.SetState) and effects[-1].state == RolloutState.ROLLED_BACK


def test_a_silent_device_times_out_and_is_retried_after_the_backoff() -> None:
    p = plan(1, backoff=5)
    d = {**committed_others("a"), "a": dep("a", DS.DOWNLOADING)}
    late = T0 + timedelta(seconds=301)
    assert el.decide(view(p, d), late) == [el.TimeOut(("a",))]  # not a gate failure: it will be retried
    timed_out = {**committed_others("a"), "a": dep("a", DS.FAILED, 1, ReasonCode.DEVICE_TIMEOUT, at=late)}
    assert el.decide(view(p, timed_out), late + timedelta(seconds=5)) == [el.Retry(("a",))]


def test_the_stage_completes_once_the_retry_commits() -> None:
    p = plan(1, backoff=5)
    d = {**committed_others("a"), "a": dep("a", DS.COMMITTED, attempt=2)}
    assert el.decide(view(p, d), T0) == [el.SetState(RolloutState.COMPLETED, ReasonCode.OK, "all stages passed")]


def test_retries_respect_the_concurrency_cap_and_go_before_new_devices() -> None:
    gates = Gates(min_devices=1, max_failure_rate=1.0, device_timeout_seconds=300, max_concurrent=1)
    p = plan(1, backoff=0, gates=gates)
    d = {"a": dep("a", DS.FAILED, reason=ReasonCode.DOWNLOAD_FAILED), "b": dep("b", DS.COMMITTED)}
    assert el.decide(view(p, d), T0) == [el.Retry(("a",))]
    busy = {**d, "c": dep("c", DS.DOWNLOADING)}
    assert el.decide(view(p, busy), T0) == []  # one in flight already: the retry waits for a slot


def test_no_retries_once_the_rollout_is_halted() -> None:
    p = plan(2, backoff=0)
    d = {**committed_others("a"), "a": dep("a", DS.FAILED, reason=ReasonCode.DOWNLOAD_FAILED)}
    paused = el.RolloutView("r1", RolloutState.PAUSED, p, DEVICES, 0, T0, None, frozenset(), d)
    assert el.decide(paused, T0 + timedelta(hours=1)) == []
    # A rollback reverts only devices that may run the bundle; a device waiting for a retry is left alone.
    effects = el.apply_command(paused, "rollback")
    assert effects[0] == el.RevertDevices(("b", "c", "d"))


def test_plan_json_round_trip_keeps_retry_settings_and_old_plans_default_to_none() -> None:
    p = plan(3, backoff=7.5)
    assert Plan.from_json(p.to_json()) == p
    old = {k: v for k, v in p.to_json().items() if k not in ("max_retries", "retry_backoff_seconds")}
    assert Plan.from_json(old).max_retries == 0
