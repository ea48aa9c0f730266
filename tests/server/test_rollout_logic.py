"""The rollout state machine fed with plain events (no database, no broker)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.rollout import engine_logic as el
from ota_server.rollout.plan import DeviceInfo, Gates, Plan, Selector, Stage, dry_run, select_targets

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DEVICES = tuple(f"d{i:02d}" for i in range(10))


def view(
    plan: Plan,
    deployments: dict[str, el.DeploymentView] | None = None,
    state: RolloutState = RolloutState.RUNNING,
    stage: int = 0,
    soak: datetime | None = None,
    approved: frozenset[int] = frozenset(),
) -> el.RolloutView:
    return el.RolloutView("r1", state, plan, DEVICES, stage, T0, soak, approved, deployments or {})


def deps(states: dict[str, DS], stage: int = 0, at: datetime = T0) -> dict[str, el.DeploymentView]:
    return {d: el.DeploymentView(d, stage, s, at) for d, s in states.items()}


CANARY = Plan(
    (Stage(percent=20, soak_seconds=60), Stage(percent=100)),
    Gates(min_devices=1, max_failure_rate=0.2, min_count_for_failure_rate=2, device_timeout_seconds=300),
)


def test_stage_sizes_are_cumulative_and_rounded_up() -> None:
    plan = Plan((Stage(percent=1), Stage(count=3), Stage(percent=50), Stage(percent=100)))
    assert plan.stage_sizes(10) == [1, 3, 5, 10]
    assert plan.stage_sizes(0) == [0, 0, 0, 0]
    assert Plan((Stage(count=50),)).stage_sizes(7) == [7]


def test_first_stage_assigns_its_share_only() -> None:
    effects = el.decide(view(CANARY), T0)
    assert effects == [el.Assign(DEVICES[:2], 0)]


def test_waits_while_devices_work_then_soaks_then_advances() -> None:
    working = deps({"d00": DS.DOWNLOADING, "d01": DS.COMMITTED})
    assert el.decide(view(CANARY, working), T0 + timedelta(seconds=10)) == []
    done = deps({"d00": DS.COMMITTED, "d01": DS.COMMITTED})
    now = T0 + timedelta(seconds=20)
    assert el.decide(view(CANARY, done), now) == [el.StartSoak(now)]
    assert el.decide(view(CANARY, done, soak=now), now + timedelta(seconds=59)) == []
    assert el.decide(view(CANARY, done, soak=now), now + timedelta(seconds=60)) == [el.EnterStage(1)]
    assigned = el.decide(view(CANARY, done, stage=1), now)
    assert assigned == [el.Assign(DEVICES[2:], 1)]


def test_last_stage_completes() -> None:
    all_done = deps(dict.fromkeys(DEVICES, DS.COMMITTED))
    effects = el.decide(view(CANARY, all_done, stage=1), T0)
    assert effects == [el.SetState(RolloutState.COMPLETED, ReasonCode.OK, "all stages passed")]


def test_failure_rate_over_gate_rolls_back_updated_and_sent_devices_and_cancels_the_in_flight() -> None:
    d = deps({"d00": DS.FAILED, "d01": DS.COMMITTED, "d02": DS.TRIAL, "d03": DS.NOTIFIED})
    effects = el.decide(view(CANARY, d, stage=1), T0)
    # d03 was sent: cancelled and reverted at once (it may still install the bundle); d00 failed: left alone
    assert effects[:2] == [el.CancelDeployments(("d03",)), el.RevertDevices(("d01", "d02", "d03"))]
    assert isinstance(effects[2], el.SetState) and effects[2].state == RolloutState.ROLLED_BACK
    assert effects[2].reason == ReasonCode.GATE_FAILED


def test_failure_rate_waits_for_the_minimum_count_and_can_pause() -> None:
    plan = Plan(CANARY.stages, Gates(max_failure_rate=0.0, min_count_for_failure_rate=2), on_failure="pause")
    one_failed = deps({"d00": DS.ROLLED_BACK, "d01": DS.INSTALLING})
    assert el.decide(view(plan, one_failed), T0) == []
    two = deps({"d00": DS.ROLLED_BACK, "d01": DS.COMMITTED})
    effects = el.decide(view(plan, two), T0)
    assert len(effects) == 1 and effects[0].state == RolloutState.PAUSED  # type: ignore[union-attr]


def test_silent_device_times_out_instead_of_hanging() -> None:
    d = deps({"d00": DS.COMMITTED, "d01": DS.NOTIFIED})
    assert el.decide(view(CANARY, d), T0 + timedelta(seconds=299)) == []
    effects = el.decide(view(CANARY, d), T0 + timedelta(seconds=301))
    assert effects[0] == el.TimeOut(("d01",))
    # one of two failed: 0.5 > 0.2 -> the gate halts the rollout in the same decision
    assert isinstance(effects[-1], el.SetState) and effects[-1].state == RolloutState.ROLLED_BACK


def test_min_devices_gate_halts_when_too_few_commit() -> None:
    plan = Plan((Stage(count=2),), Gates(min_devices=2, max_failure_rate=1.0))
    d = deps({"d00": DS.COMMITTED, "d01": DS.FAILED})
    effects = el.decide(view(plan, d), T0)
    assert isinstance(effects[-1], el.SetState) and effects[-1].reason == ReasonCode.GATE_FAILED


def test_approval_holds_a_stage() -> None:
    plan = Plan((Stage(count=1), Stage(percent=100, requires_approval=True)))
    d = deps({"d00": DS.COMMITTED})
    assert el.decide(view(plan, d, stage=1), T0) == []
    assert el.apply_command(view(plan, d, stage=1), "approve") == [el.ApproveStage(1)]
    assert el.decide(view(plan, d, stage=1, approved=frozenset({1})), T0) == [el.Assign(DEVICES[1:], 1)]
    with pytest.raises(el.TransitionError):
        el.apply_command(view(plan, d, stage=0), "approve")


def test_not_running_does_nothing() -> None:
    for state in (RolloutState.PAUSED, RolloutState.DRAFT, RolloutState.COMPLETED, RolloutState.ROLLED_BACK):
        assert el.decide(view(CANARY, state=state), T0) == []


@pytest.mark.parametrize(
    ("state", "command", "allowed"),
    [
        (RolloutState.DRAFT, "start", True),
        (RolloutState.RUNNING, "start", False),
        (RolloutState.RUNNING, "pause", True),
        (RolloutState.PAUSED, "pause", False),
        (RolloutState.PAUSED, "resume", True),
        (RolloutState.RUNNING, "resume", False),
        (RolloutState.COMPLETED, "abort", False),
        (RolloutState.RUNNING, "abort", True),
        (RolloutState.COMPLETED, "rollback", True),
        (RolloutState.ROLLED_BACK, "rollback", False),
        (RolloutState.DRAFT, "rollback", False),
    ],
)
def test_command_transitions(state: RolloutState, command: el.Command, allowed: bool) -> None:
    v = view(CANARY, state=state)
    if allowed:
        assert el.apply_command(v, command)
    else:
        with pytest.raises(el.TransitionError):
            el.apply_command(v, command)


def test_abort_stop_here_versus_revert() -> None:
    d = deps({"d00": DS.COMMITTED, "d01": DS.PENDING, "d02": DS.DOWNLOADING})
    stop = el.apply_command(view(CANARY, d), "abort")
    assert stop[0] == el.CancelDeployments(("d01",)) and stop[-1].state == RolloutState.ABORTED  # type: ignore[union-attr]
    revert = el.apply_command(view(CANARY, d), "abort_revert")
    # d02 was sent (downloading): cancelled and reverted; d01 never left the server (pending): only cancelled
    assert el.RevertDevices(("d00", "d02")) in revert and el.CancelDeployments(("d01", "d02")) in revert


def test_duplicate_late_and_out_of_order_reports() -> None:
    assert el.apply_report(DS.NOTIFIED, DS.DOWNLOADING) == DS.DOWNLOADING
    assert el.apply_report(DS.DOWNLOADING, DS.DOWNLOADING) is None  # duplicate
    assert el.apply_report(DS.TRIAL, DS.DOWNLOADED) is None  # late
    assert el.apply_report(DS.NOTIFIED, DS.COMMITTED) == DS.COMMITTED  # skipped steps
    assert el.apply_report(DS.COMMITTED, DS.TRIAL) is None  # out of order after the end
    assert el.apply_report(DS.COMMITTED, DS.ROLLED_BACK) == DS.ROLLED_BACK  # later health failure
    assert el.apply_report(DS.FAILED, DS.COMMITTED) is None


def test_targets_only_profiles_with_bundles_and_skip_rolled_back() -> None:
    devices = [
        DeviceInfo("a", "x86", {"site": "n"}),
        DeviceInfo("b", "arm", {"site": "n"}),
        DeviceInfo("c", "x86", {"site": "s"}),
        DeviceInfo("d", "x86", {"site": "n"}),
    ]
    t = select_targets("r", Selector(labels={"site": "n"}), devices, {"x86"}, {"d"})
    assert set(t.targets) == {"a"} and t.no_bundle == ("b",) and t.skipped == ("d",)
    everyone = select_targets("r", Selector(), devices, {"x86", "arm"})
    assert sorted(everyone.targets) == ["a", "b", "c", "d"]
    assert select_targets("r", Selector(), devices, {"x86", "arm"}).targets == everyone.targets  # stable order
    stages = dry_run(Plan((Stage(count=1), Stage(percent=100))), everyone)
    assert [len(s["devices"]) for s in stages] == [1, 3]
    assert [d for s in stages for d in s["devices"]] == list(everyone.targets)


def test_concurrency_cap_limits_assignments_in_flight() -> None:
    plan = Plan((Stage(percent=100),), Gates(max_concurrent=3, max_failure_rate=1.0))
    assert el.decide(view(plan), T0) == [el.Assign(DEVICES[:3], 0)]
    busy = deps({"d00": DS.DOWNLOADING, "d01": DS.COMMITTED, "d02": DS.TRIAL})
    assert el.decide(view(plan, busy), T0) == [el.Assign(DEVICES[3:4], 0)]
    full = deps({"d00": DS.DOWNLOADING, "d01": DS.NOTIFIED, "d02": DS.TRIAL})
    assert el.decide(view(plan, full), T0) == []


def test_maintenance_windows_hold_new_assignments() -> None:
    from ota_server.rollout.plan import Window

    night = Plan((Stage(percent=100),), windows=(Window(22 * 60, 2 * 60),))  # 22:00-02:00 UTC
    assert el.decide(view(night), T0.replace(hour=12)) == []
    assert el.decide(view(night), T0.replace(hour=23, minute=30)) == [el.Assign(DEVICES, 0)]
    assert el.decide(view(night), T0.replace(hour=1, minute=59)) == [el.Assign(DEVICES, 0)]
    assert el.decide(view(night), T0.replace(hour=2)) == []
    # Outside the window, running deployments still time out and gates still act.
    d = deps({"d00": DS.NOTIFIED})
    late = T0.replace(hour=12) + timedelta(days=1)
    assert el.decide(view(night, d), late)[0] == el.TimeOut(("d00",))
    assert Plan.from_json(night.to_json()) == night
