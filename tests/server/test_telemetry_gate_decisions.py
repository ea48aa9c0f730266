"""The engine's use of typed gate results: pure decisions, no database.

A failed gate halts at once; a gate without enough data holds its stage after the soak for the data
timeout, then takes the plan's failure action with "gate X not evaluated: n of m", or (a plan that
opts to pass) lets the stage pass and says so. A rollout never completes as "all stages passed"
while a gate it sets never ran.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.rollout import engine_logic as el
from ota_server.rollout.gate_results import GateResult, data_timeout_seconds
from ota_server.rollout.plan import Gates, Plan, Stage

T0 = datetime(2026, 6, 1, tzinfo=UTC)
DS = DeploymentState
GATES = Gates(max_p95_latency_ratio=1.5, gate_data_timeout_seconds=120)
ONE_STAGE = Plan(stages=(Stage(percent=100),), gates=GATES)
TWO_STAGES = Plan(stages=(Stage(count=1, soak_seconds=60), Stage(percent=100)), gates=GATES)
WAITING = GateResult("p95_latency_ratio", "not_evaluated", 1.5, None, 0, 100, "requests", "baseline: 0 of 100")
PASSED = GateResult("p95_latency_ratio", "passed", 1.5, 1.1, 400, None, "requests", "p95 1.1x")
FAILED = GateResult("p95_latency_ratio", "failed", 1.5, 3.0, 400, None, "requests", "p95 latency 6 ms is 3.00x")


def view(
    plan: Plan = ONE_STAGE,
    gates: tuple[GateResult, ...] = (),
    soak_started_at: datetime | None = None,
    stage: int = 0,
    devices: tuple[str, ...] | None = None,
    state: RolloutState = RolloutState.RUNNING,
    halted_by: el.Gate | None = None,
) -> el.RolloutView:
    if devices is None:
        devices = ("d1",) if plan.stages[0].count == 1 else ("d1", "d2")
    deps = {d: el.DeploymentView(d, 0, DS.COMMITTED, T0) for d in devices}
    return el.RolloutView(
        "r1", state, plan, ("d1", "d2"), stage, T0, soak_started_at, frozenset(), deps, gates, halted_by
    )


def test_passed_gates_let_the_rollout_complete_and_say_which_ran() -> None:
    (done,) = el.decide(view(gates=(PASSED,)), T0)
    assert isinstance(done, el.SetState) and done.state == RolloutState.COMPLETED
    assert done.detail == "all stages passed (gates passed: p95_latency_ratio)" and done.gates == (PASSED,)
    (plain,) = el.decide(view(plan=replace(ONE_STAGE, gates=Gates())), T0)
    assert isinstance(plain, el.SetState) and plain.detail == "all stages passed"


def test_a_failed_gate_halts_at_once_even_while_soaking() -> None:
    effects = el.decide(view(plan=TWO_STAGES, gates=(FAILED,), soak_started_at=T0), T0 + timedelta(seconds=1))
    last = effects[-1]
    assert isinstance(last, el.SetState) and last.state == RolloutState.ROLLED_BACK
    assert last.halted_by == el.Gate.TELEMETRY and last.reason == ReasonCode.GATE_FAILED
    assert last.detail == "gate p95_latency_ratio failed: p95 latency 6 ms is 3.00x" and last.gates == (FAILED,)
    assert el.RevertDevices(("d1",)) in effects  # stage 0: one device


def test_a_gate_without_data_holds_the_stage_then_fails_with_n_of_m() -> None:
    # no soak: the stage starts waiting for data (its "soak" marks when) instead of completing
    assert el.decide(view(gates=(WAITING,)), T0) == [el.StartSoak(T0)]
    assert el.decide(view(gates=(WAITING,), soak_started_at=T0), T0 + timedelta(seconds=119)) == []
    effects = el.decide(view(gates=(WAITING,), soak_started_at=T0), T0 + timedelta(seconds=120))
    last = effects[-1]
    assert isinstance(last, el.SetState) and last.state == RolloutState.ROLLED_BACK
    assert last.halted_by == el.Gate.NOT_EVALUATED and last.reason == ReasonCode.GATE_FAILED
    assert last.detail == "gate p95_latency_ratio not evaluated: 0 of 100 requests"
    assert "all stages passed" not in last.detail
    paused = el.decide(view(plan=replace(ONE_STAGE, on_failure="pause"), gates=(WAITING,), soak_started_at=T0), T0 + timedelta(hours=1))  # fmt: skip
    assert paused == [
        el.SetState(RolloutState.PAUSED, ReasonCode.GATE_FAILED, last.detail, el.Gate.NOT_EVALUATED, gates=(WAITING,))
    ]


def test_missing_data_holds_later_stages_back() -> None:
    """Stage 0 (one device, 60 s soak) waits for its gate: stage 1 gets no device until the gate is judged."""
    soaked = T0 + timedelta(seconds=61)
    assert el.decide(view(plan=TWO_STAGES, gates=(WAITING,), soak_started_at=T0), soaked) == []
    entered = el.decide(view(plan=TWO_STAGES, gates=(PASSED,), soak_started_at=T0), soaked)
    assert entered == [el.EnterStage(1, gates=(PASSED,))]
    # the wait after the soak is the plan's gate_data_timeout_seconds (default: the soak, at least 600 s)
    assert data_timeout_seconds(Gates(), 60) == 600 and data_timeout_seconds(Gates(), 3600) == 3600
    assert data_timeout_seconds(GATES, 3600) == 120


def test_a_plan_may_opt_to_pass_and_then_says_which_gates_did_not_run() -> None:
    lenient = replace(ONE_STAGE, on_missing_data="pass")
    assert el.decide(view(plan=lenient, gates=(WAITING,), soak_started_at=T0), T0 + timedelta(seconds=60)) == []
    (done,) = el.decide(view(plan=lenient, gates=(WAITING,), soak_started_at=T0), T0 + timedelta(seconds=120))
    assert isinstance(done, el.SetState) and done.state == RolloutState.COMPLETED
    assert "all stages passed" not in done.detail
    assert done.detail == (
        "stages passed with gates not evaluated (plan on_missing_data: pass): "
        "gate p95_latency_ratio not evaluated: 0 of 100 requests"
    )
    # a middle stage passes on to the next one carrying the verdicts for the audit log
    two = replace(TWO_STAGES, on_missing_data="pass")
    later = T0 + timedelta(seconds=60 + 120)
    assert el.decide(view(plan=two, gates=(WAITING,), soak_started_at=T0), later) == [el.EnterStage(1, (WAITING,))]


def test_resuming_a_rollout_halted_for_missing_data_restarts_the_wait() -> None:
    halted = view(gates=(WAITING,), soak_started_at=T0, state=RolloutState.PAUSED, halted_by=el.Gate.NOT_EVALUATED)
    now = T0 + timedelta(hours=2)
    assert el.apply_command(halted, "resume", now) == [
        el.SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "resumed"),
        el.StartSoak(now),
    ]
    other = replace(halted, halted_by=el.Gate.TELEMETRY)
    assert el.apply_command(other, "resume", now) == [el.SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "resumed")]
