"""The transition rules fed with plain events: status reports, check-ins, operator commands, engine ticks.

No database, no broker: the pure functions of ``ota_server.rollout`` and their effects. The database-level
consequences (targeting, the unit of work) are in ``test_rollout_rollback_record.py``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from edgeota_contract.states import DeploymentState as DS
from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.errors import Conflict
from ota_server.models import Deployment
from ota_server.rollout import deployment_rules as rules
from ota_server.rollout import engine_logic as el
from ota_server.rollout.gate_results import GateResult
from ota_server.rollout.plan import Gates, Plan, Stage
from ota_server.rollout.records import move, server_move

T0 = datetime(2026, 1, 1, tzinfo=UTC)
OLD_SHA, NEW_SHA = "a" * 64, "b" * 64

INSTALL = rules.DeploymentFacts(
    id="inst", device_id="d1", mode="install", model_name="m", version="1.1.0", bundle_sha256=NEW_SHA,
    release_counter=1_001_000, state=DS.COMMITTED,
)  # fmt: skip
BACK = rules.DeploymentFacts(
    id="back", device_id="d1", mode="rollback", model_name="m", version="1.0.0", bundle_sha256=OLD_SHA,
    release_counter=1_000_000, state=DS.NOTIFIED, reason=ReasonCode.SERVER_ROLLBACK.value,
)  # fmt: skip
REVERTED = replace(INSTALL, reverted_by="back", rollout_revert_ordered=True)


def runs(sha: str = OLD_SHA, version: str = "1.0.0", counter: int = 1_000_000) -> dict[str, rules.RunningFacts]:
    return {"m": rules.RunningFacts("m", version, sha, counter, serving=True)}


def transitions(effects: list[rules.DeploymentEffect]) -> dict[str, tuple[str, DS, object]]:
    return {e.deployment_id: (e.rule, e.state, e.reason) for e in effects if isinstance(e, rules.Transition)}


# ------------------------------------------------------------------ the rule table and the applier


def test_every_rule_names_its_from_states_and_the_applier_refuses_the_rest() -> None:
    assert set(rules.RULES) == {
        "notify", "report", "supersede", "time_out", "cancel", "stop_shadow",
        "server_rollback_landed", "device_went_back", "checkin_active", "checkin_runs_it",
    }  # fmt: skip
    notify = rules.RULES["notify"]
    assert rules.allows(notify, DS.PENDING, DS.NOTIFIED)
    assert not any(rules.allows(notify, s, DS.NOTIFIED) for s in DS if s != DS.PENDING)
    for name in ("supersede", "time_out", "cancel", "checkin_runs_it"):
        assert not any(rules.allows(rules.RULES[name], s, rules.RULES[name].to_state or s) for s in DS if s.terminal)
    landed = rules.RULES["server_rollback_landed"]
    assert rules.allows(landed, DS.COMMITTED, DS.ROLLED_BACK)
    assert not rules.allows(landed, DS.TRIAL, DS.ROLLED_BACK) and not rules.allows(landed, DS.COMMITTED, DS.FAILED)

    row = Deployment(id="x", state=DS.COMMITTED.value, reason="ok", detail="")
    assert not server_move(row, "cancel", T0)  # a committed install cannot be cancelled
    assert row.state == DS.COMMITTED.value
    assert not move(row, rules.Transition("x", "report", DS.TRIAL, "ok", ""), T0)  # out of order after the end
    assert move(row, rules.Transition("x", "server_rollback_landed", DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED), T0)
    assert (row.state, row.reason) == ("rolled_back", "server_rollback")  # the rule's fixed reason wins


def test_transition_error_is_a_conflict() -> None:
    assert issubclass(el.TransitionError, Conflict)


# ------------------------------------------------------------------ status reports


def test_reports_move_forward_and_duplicate_late_or_out_of_order_ones_are_stale() -> None:
    dep = replace(INSTALL, state=DS.NOTIFIED)
    out = rules.on_status_report(dep, DS.DOWNLOADING, ReasonCode.OK, "")
    assert out.ignored is None and out.effects == [
        rules.Transition("inst", "report", DS.DOWNLOADING, ReasonCode.OK, "")
    ]
    at_trial = replace(dep, state=DS.TRIAL)
    assert rules.on_status_report(at_trial, DS.TRIAL, ReasonCode.OK, "") == rules.ReportOutcome([], "stale")
    assert rules.on_status_report(at_trial, DS.DOWNLOADED, ReasonCode.OK, "") == rules.ReportOutcome([], "stale")
    assert rules.on_status_report(INSTALL, DS.TRIAL, ReasonCode.OK, "") == rules.ReportOutcome([], "stale")
    done = rules.on_status_report(at_trial, DS.COMMITTED, ReasonCode.OK, "")
    assert done.effects == [
        rules.Transition("inst", "report", DS.COMMITTED, ReasonCode.OK, ""),
        rules.RecordRunning("d1", NEW_SHA),
    ]
    # The device's own health window fails after the commit: its reason is kept.
    later = rules.on_status_report(INSTALL, DS.ROLLED_BACK, ReasonCode.LATENCY_OVER_BUDGET, "p95 high")
    assert transitions(later.effects) == {"inst": ("report", DS.ROLLED_BACK, ReasonCode.LATENCY_OVER_BUDGET)}


def test_a_late_commit_is_recorded_and_reverted_only_when_the_rollout_ordered_a_revert() -> None:
    cancelled = replace(INSTALL, state=DS.FAILED, reason=ReasonCode.CANCELLED.value)
    plain_abort = rules.on_status_report(cancelled, DS.COMMITTED, ReasonCode.OK, "")
    assert plain_abort == rules.ReportOutcome([rules.RecordRunning("d1", NEW_SHA)], "stale")
    reverted = rules.on_status_report(replace(cancelled, rollout_revert_ordered=True), DS.COMMITTED, ReasonCode.OK, "")
    assert reverted == rules.ReportOutcome([rules.RecordRunning("d1", NEW_SHA), rules.RevertLate("inst")], "stale")
    # a failure of the device's own is final: no late commit there
    own = replace(cancelled, reason=ReasonCode.SMOKE_TEST_FAILED.value, rollout_revert_ordered=True)
    assert rules.on_status_report(own, DS.COMMITTED, ReasonCode.OK, "") == rules.ReportOutcome([], "stale")


def test_the_rollback_deployments_commit_lands_the_reverted_install_as_a_server_rollback() -> None:
    trial_install = replace(REVERTED, id="inst2", state=DS.TRIAL)
    out = rules.on_status_report(
        replace(BACK, state=DS.TRIAL), DS.COMMITTED, ReasonCode.OK, "", [REVERTED, trial_install]
    )
    assert transitions(out.effects) == {
        "back": ("report", DS.COMMITTED, ReasonCode.OK),
        "inst": ("server_rollback_landed", DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK),
    }
    assert rules.RecordRunning("d1", OLD_SHA) in out.effects
    # a duplicate of that report changes nothing
    dup = rules.on_status_report(replace(BACK, state=DS.COMMITTED), DS.COMMITTED, ReasonCode.OK, "", [REVERTED])
    assert dup == rules.ReportOutcome([], "stale")


# ------------------------------------------------------------------ check-ins


def test_checkin_before_the_rollback_report_lands_the_install_as_a_server_rollback() -> None:
    """The device already runs the previous bundle; the rollback deployment's report has not arrived."""
    effects = rules.on_checkin([REVERTED, BACK], runs(), None, None)
    assert transitions(effects) == {
        "inst": ("server_rollback_landed", DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK),
        "back": ("checkin_runs_it", DS.COMMITTED, ReasonCode.OK),
    }
    assert not any(isinstance(e, rules.Resend) for e in effects)


def test_checkin_during_the_rollback_lands_the_install_and_moves_the_active_rollback_on() -> None:
    during = rules.on_checkin([REVERTED, BACK], runs(), "back", DS.TRIAL)
    assert transitions(during) == {
        "inst": ("server_rollback_landed", DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK),
        "back": ("checkin_active", DS.TRIAL, None),
    }
    assert during[-1] == rules.Resend(("back",))  # still open: sent again
    # Before the switch the device still runs the release: nothing is relabelled yet.
    early = rules.on_checkin([REVERTED, BACK], runs(NEW_SHA, "1.1.0", 1_001_000), "back", DS.DOWNLOADING)
    assert transitions(early) == {"back": ("checkin_active", DS.DOWNLOADING, None)}


def test_checkin_after_the_rollback_report_changes_nothing() -> None:
    landed = replace(REVERTED, state=DS.ROLLED_BACK, reason=ReasonCode.SERVER_ROLLBACK.value)
    assert rules.on_checkin([landed, replace(BACK, state=DS.COMMITTED)], runs(), None, None) == []


def test_a_committed_install_the_device_left_by_itself_is_a_health_rollback() -> None:
    effects = rules.on_checkin([INSTALL], runs(), None, None)
    assert transitions(effects) == {"inst": ("device_went_back", DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED)}
    # not when the device runs a newer bundle, nor while the install is the active one
    assert rules.on_checkin([INSTALL], runs("c" * 64, "1.2.0", 1_002_000), None, None) == []
    assert rules.on_checkin([INSTALL], runs(), "inst", None) == []


def test_checkin_reconciles_open_deployments_and_resends_the_rest() -> None:
    open_install = replace(INSTALL, state=DS.NOTIFIED)
    assert rules.on_checkin([open_install], runs(), None, None) == [rules.Resend(("inst",))]
    assert transitions(rules.on_checkin([open_install], runs(NEW_SHA, "1.1.0", 1_001_000), None, None)) == {
        "inst": ("checkin_runs_it", DS.COMMITTED, ReasonCode.OK)
    }
    # the active deployment takes the check-in's state only when that is progress
    at_trial = replace(INSTALL, state=DS.TRIAL)
    assert rules.on_checkin([at_trial], runs(), "inst", DS.DOWNLOADING) == [rules.Resend(("inst",))]
    shadow = replace(INSTALL, mode="shadow", state=DS.NOTIFIED)
    shadowing = {"m": rules.RunningFacts("m", "1.0.0", OLD_SHA, 1_000_000, True, shadow_version="1.1.0")}
    assert transitions(rules.on_checkin([shadow], shadowing, None, None)) == {
        "inst": ("checkin_runs_it", DS.COMMITTED, ReasonCode.OK)
    }


def test_checkin_reverts_a_late_commit_only_when_the_rollout_ordered_a_revert() -> None:
    late = replace(INSTALL, state=DS.FAILED, reason=ReasonCode.DEVICE_TIMEOUT.value)
    running_new = runs(NEW_SHA, "1.1.0", 1_001_000)
    assert rules.on_checkin([late], running_new, None, None) == []
    assert rules.on_checkin([replace(late, rollout_revert_ordered=True)], running_new, None, None) == [
        rules.RevertLate("inst")
    ]


# ------------------------------------------------------------------ rollout: ticks and operator commands

PLAN = Plan((Stage(percent=100),), Gates(min_devices=1, max_failure_rate=0.0, min_count_for_failure_rate=1))


def view(
    state: RolloutState = RolloutState.RUNNING, deployments: dict[str, DS] | None = None, plan: Plan = PLAN
) -> el.RolloutView:
    deps = {d: el.DeploymentView(d, 0, s, T0) for d, s in (deployments or {}).items()}
    return el.RolloutView("r1", state, plan, ("d1", "d2"), 0, T0, None, frozenset(), deps)


def test_a_gate_names_itself_and_its_rollback_is_a_typed_fact() -> None:
    effects = el.decide(view(deployments={"d1": DS.COMMITTED, "d2": DS.FAILED}), T0)
    assert effects[-1] == el.SetState(
        RolloutState.ROLLED_BACK,
        ReasonCode.GATE_FAILED,
        "failure rate 0.50 over 0.00 after 2 devices",
        halted_by=el.Gate.FAILURE_RATE,
        revert_ordered=True,
    )
    assert el.RevertDevices(("d1",)) in effects
    paused = el.decide(
        view(deployments={"d1": DS.COMMITTED, "d2": DS.FAILED}, plan=replace(PLAN, on_failure="pause")), T0
    )
    assert paused == [el.SetState(RolloutState.PAUSED, ReasonCode.GATE_FAILED, paused[0].detail, el.Gate.FAILURE_RATE)]  # type: ignore[union-attr]
    failing_gate = GateResult("error_rate", "failed", 0.1, 0.5, 200, None, "requests", "error rate 0.500 over 0.100")
    telemetry = replace(view(deployments={"d1": DS.COMMITTED}), gate_results=(failing_gate,))
    last = el.decide(telemetry, T0)[-1]
    assert isinstance(last, el.SetState) and last.halted_by == el.Gate.TELEMETRY and last.revert_ordered
    few = el.decide(view(deployments={"d1": DS.FAILED, "d2": DS.FAILED}, plan=replace(PLAN, gates=Gates(max_failure_rate=1.0, min_devices=2))), T0)  # fmt: skip
    assert isinstance(few[-1], el.SetState) and few[-1].halted_by == el.Gate.MIN_DEVICES


def test_operator_commands_follow_the_from_state_table() -> None:
    for command, allowed in el.COMMAND_FROM.items():
        if command == "approve":
            continue  # also needs a stage that requires approval: test_rollout_logic
        # retry_failed also needs a failed device (without one it is refused in every state)
        deployments = {"d1": DS.FAILED} if command == "retry_failed" else None
        for state in RolloutState:
            if state in allowed:
                assert el.apply_command(view(state, deployments), command)  # type: ignore[arg-type]
            else:
                with pytest.raises(el.TransitionError):
                    el.apply_command(view(state, deployments), command)  # type: ignore[arg-type]
    with pytest.raises(el.TransitionError, match="unknown command"):
        el.apply_command(view(), "explode")  # type: ignore[arg-type]
    assert el.schedule(view(RolloutState.DRAFT), T0)[0] == el.Schedule(T0)
    with pytest.raises(el.TransitionError):
        el.schedule(view(RolloutState.RUNNING), T0)


def test_only_reverting_commands_record_that_a_revert_was_ordered() -> None:
    updated = {"d1": DS.COMMITTED, "d2": DS.PENDING}
    abort = el.apply_command(view(deployments=updated), "abort")
    assert abort == [el.CancelDeployments(("d2",)), el.SetState(RolloutState.ABORTED, ReasonCode.MANUAL, "aborted")]
    revert = el.apply_command(view(deployments=updated), "abort_revert")
    assert revert[-1] == el.SetState(
        RolloutState.ABORTED, ReasonCode.MANUAL, "aborted and reverted", revert_ordered=True
    )
    assert el.RevertDevices(("d1",)) in revert and el.CancelDeployments(("d2",)) in revert
    back = el.apply_command(view(RolloutState.COMPLETED, {"d1": DS.COMMITTED, "d2": DS.COMMITTED}), "rollback")
    assert back == [
        el.RevertDevices(("d1", "d2")),
        el.SetState(RolloutState.ROLLED_BACK, ReasonCode.MANUAL, "rolled back", revert_ordered=True),
    ]


def test_devices_a_newer_rollout_took_are_not_failures_of_this_one() -> None:
    """A rollout whose in-flight deployments a newer rollout superseded neither counts them as device failures (it
    used to roll itself back: "failure rate 0.49", seen with 10,000 emulated devices) nor waits for them."""
    deps = {
        "d1": el.DeploymentView("d1", 0, DS.COMMITTED, T0),
        "d2": el.DeploymentView("d2", 0, DS.FAILED, T0, reason=ReasonCode.SUPERSEDED),
    }
    counts = el.count(deps)
    assert (counts.committed, counts.failed, counts.moved, counts.in_progress) == (1, 0, 1, 0)
    effects = el.decide(
        el.RolloutView("r1", RolloutState.RUNNING, PLAN, ("d1", "d2"), 0, T0, None, frozenset(), deps), T0
    )
    assert not any(isinstance(e, el.SetState) and e.state == RolloutState.ROLLED_BACK for e in effects), effects
    really_failed = {**deps, "d2": el.DeploymentView("d2", 0, DS.FAILED, T0, reason=ReasonCode.DOWNLOAD_FAILED)}
    assert el.count(really_failed).failed == 1
