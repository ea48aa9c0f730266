"""The rollout state machine: pure transition functions over plain data.

Two sources change a rollout: the engine tick (:func:`decide`, which looks at a running rollout and
the deployments it has made and returns the effects to apply: assign devices, time deployments out,
advance, complete, pause, roll back) and an operator (:func:`apply_command`, whose allowed from-states
are the plain table :data:`COMMAND_FROM`). Devices change deployments, not rollouts: their rules are in
:mod:`ota_server.rollout.deployment_rules`. Nothing here does I/O, so the engine can be tested by
feeding views and events; :mod:`ota_server.rollout.apply` persists the effects in one unit of work
(:mod:`ota_server.rollout.unit_of_work`). Applying the effects and calling again is idempotent:
effects describe state, not increments.

The effects are the dataclasses of :mod:`ota_server.rollout.effects` (re-exported here). Facts that later
decisions read are typed fields of :class:`SetState`, never words of its ``detail``:
``halted_by`` names the gate that fired (:class:`Gate`), ``revert_ordered`` says that the devices
were ordered back to their previous bundle: the updated ones and those whose install was already sent,
cancelled and reverted at once (:func:`revert_effects`); a late commit then finds its rollback deployment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.errors import Conflict
from ota_server.rollout.deployment_rules import apply_report
from ota_server.rollout.effects import (
    ApproveStage,
    Assign,
    CancelDeployments,
    Effect,
    EnterStage,
    Gate,
    Retry,
    RevertDevices,
    Schedule,
    SetState,
    StartSoak,
    TimeOut,
)
from ota_server.rollout.gate_results import GateResult, data_timeout_seconds, failed, not_evaluated
from ota_server.rollout.plan import Plan, Stage

__all__ = [  # the effects (ota_server.rollout.effects) are re-exported: decide and apply_command return them
    "COMMAND_FROM",
    "DS",
    "FAILED_STATES",
    "RETRYABLE_REASONS",
    "REVERT_AT_ONCE_STATES",
    "SCHEDULE_FROM",
    "SENT_STATES",
    "UPDATED_STATES",
    "ApproveStage",
    "Assign",
    "CancelDeployments",
    "Command",
    "Counts",
    "DeploymentView",
    "Effect",
    "EnterStage",
    "Gate",
    "Retry",
    "RevertDevices",
    "RolloutView",
    "Schedule",
    "SetState",
    "StartSoak",
    "TimeOut",
    "TransitionError",
    "apply_command",
    "apply_report",
    "count",
    "decide",
    "retry_due",
    "revert_effects",
    "schedule",
    "will_retry",
]

DS = DeploymentState
UPDATED_STATES = frozenset({DS.INSTALLING, DS.TRIAL, DS.COMMITTED})
"""Deployment states in which the device may already run the new bundle (so rollback must revert it)."""
SENT_STATES = frozenset(s for s in DS if not s.terminal and s != DS.PENDING)
"""Open deployments the device has been sent: it may still install the bundle after the server cancels them."""
REVERT_AT_ONCE_STATES = UPDATED_STATES | SENT_STATES
"""Deployment states whose device a halt that reverts orders back at once (:func:`revert_effects`): it runs the new
bundle, or may still install it."""
FAILED_STATES = frozenset({DS.FAILED, DS.ROLLED_BACK})
MOVED_BY_SERVER = frozenset({ReasonCode.SUPERSEDED})
"""Reasons of a ``failed`` deployment the server ended itself because a newer rollout took the device: not a
device failure, so outside the failure-rate gate (a rollout used to roll itself back when a newer rollout
superseded its devices' in-flight deployments), and not waited for."""
RETRYABLE_REASONS = frozenset(
    {
        ReasonCode.DOWNLOAD_FAILED,
        ReasonCode.DOWNLOAD_TIMEOUT,
        ReasonCode.DISK_FULL,
        ReasonCode.DEVICE_TIMEOUT,
        ReasonCode.INTERRUPTED,
    }
)
"""Why a ``failed`` deployment may be re-assigned (``max_retries``): transient trouble on the way to the
device. A bad bundle (signature, manifest, profile), a failed smoke test or health trial and anything
``rolled_back`` is never retried: the same bundle would fail the same way."""


class TransitionError(Conflict):
    """A manual command that the rollout's current state does not allow (the API answers 409)."""

    default_reason = ReasonCode.MANUAL


@dataclass(frozen=True)
class DeploymentView:
    """The latest attempt of a device's deployment in this rollout."""

    device_id: str
    stage: int
    state: DeploymentState
    last_change: datetime
    attempt: int = 1
    reason: ReasonCode = ReasonCode.OK


@dataclass(frozen=True)
class RolloutView:
    rollout_id: str
    state: RolloutState
    plan: Plan
    targets: tuple[str, ...]
    current_stage: int
    stage_started_at: datetime | None
    soak_started_at: datetime | None
    approved_stages: frozenset[int]
    deployments: Mapping[str, DeploymentView] = field(default_factory=dict)
    """Install deployments of this rollout, by device id."""
    gate_results: tuple[GateResult, ...] = ()
    """This tick's verdict of every telemetry gate the plan sets (:func:`~ota_server.rollout.gate_results.evaluate_gates`)."""
    halted_by: Gate | None = None
    """The gate that halted the rollout last (``Rollout.halted_by``)."""


@dataclass(frozen=True)
class Counts:
    assigned: int
    committed: int
    failed: int
    """Final failures only: a deployment that will be retried is not counted here."""
    in_progress: int
    """Not finished: running on the device, or failed and waiting for its retry."""
    active: int = 0
    """Deployments in flight on devices (not terminal): what ``max_concurrent`` caps."""
    moved: int = 0
    """Ended by the server because a newer rollout took the device (superseded): neither committed nor a device
    failure, so outside the failure rate, and not waited for."""

    @property
    def finished(self) -> int:
        return self.committed + self.failed


def will_retry(d: DeploymentView, max_retries: int) -> bool:
    """True when ``d`` failed for a transient reason and has attempts left."""
    return d.state == DS.FAILED and d.reason in RETRYABLE_REASONS and d.attempt <= max_retries


def count(deployments: Mapping[str, DeploymentView], max_retries: int = 0) -> Counts:
    committed = sum(1 for d in deployments.values() if d.state == DS.COMMITTED)
    moved = sum(1 for d in deployments.values() if d.state == DS.FAILED and d.reason in MOVED_BY_SERVER)
    failed = sum(
        1
        for d in deployments.values()
        if d.state in FAILED_STATES and not will_retry(d, max_retries) and d.reason not in MOVED_BY_SERVER
    )
    active = sum(1 for d in deployments.values() if not d.state.terminal)
    return Counts(len(deployments), committed, failed, len(deployments) - committed - failed - moved, active, moved)


def retry_due(d: DeploymentView, plan: Plan, now: datetime) -> bool:
    """A retry waits ``retry_backoff_seconds * 2 ** (attempt - 1)`` after the failed attempt's last change."""
    backoff = plan.retry_backoff_seconds * 2 ** (d.attempt - 1)
    return will_retry(d, plan.max_retries) and (now - d.last_change).total_seconds() >= backoff


def _halt(view: RolloutView, deployments: Mapping[str, DeploymentView], gate: Gate, detail: str) -> list[Effect]:
    gates = view.gate_results
    if view.plan.on_failure == "pause":
        return [SetState(RolloutState.PAUSED, ReasonCode.GATE_FAILED, detail, halted_by=gate, gates=gates)]
    return [
        *revert_effects(deployments),
        SetState(
            RolloutState.ROLLED_BACK, ReasonCode.GATE_FAILED, detail, halted_by=gate, revert_ordered=True, gates=gates
        ),
    ]


def revert_effects(deployments: Mapping[str, DeploymentView]) -> list[Effect]:
    """Order the rollout's devices back: the effects of a halt that reverts (see :data:`REVERT_AT_ONCE_STATES`).

    An install already sent (any open state but ``pending``) is cancelled and its device reverted in the same
    unit of work: the device never hears the cancel and usually finishes the install, but it queues the signed
    rollback assignment that arrives meanwhile and runs it next, so it lands on its previous bundle without the
    server waiting for the install's late ``committed``. A ``pending`` install (never sent) is only cancelled;
    an updated device (``installing``/``trial``/``committed``) is only reverted. Every halt that reverts uses
    it (a staged rollout's gate, ``rollback``, ``abort --revert``, a bandit rollout with no healthy arm).
    """
    revert = tuple(sorted(d.device_id for d in deployments.values() if d.state in REVERT_AT_ONCE_STATES))
    cancel = tuple(
        sorted(d.device_id for d in deployments.values() if not d.state.terminal and d.state not in UPDATED_STATES)
    )
    effects: list[Effect] = []
    if cancel:
        effects.append(CancelDeployments(cancel))
    if revert:
        effects.append(RevertDevices(revert))
    return effects


def decide(view: RolloutView, now: datetime) -> list[Effect]:
    """The effects a running rollout needs now; an empty list means "wait"."""
    if view.state != RolloutState.RUNNING:
        return []
    gates = view.plan.gates
    effects: list[Effect] = []
    deployments = dict(view.deployments)

    timed_out = tuple(
        sorted(
            d.device_id
            for d in deployments.values()
            if not d.state.terminal and (now - d.last_change).total_seconds() > gates.device_timeout_seconds
        )
    )
    if timed_out:
        effects.append(TimeOut(timed_out))
        for device_id in timed_out:
            old = deployments[device_id]
            deployments[device_id] = DeploymentView(
                device_id, old.stage, DS.FAILED, now, old.attempt, ReasonCode.DEVICE_TIMEOUT
            )

    failing = failed(view.gate_results)
    if failing:
        detail = "; ".join(g.describe() for g in failing)
        return [*effects, *_halt(view, deployments, Gate.TELEMETRY, detail)]
    counts = count(deployments, view.plan.max_retries)
    if counts.finished >= max(1, gates.min_count_for_failure_rate):
        rate = counts.failed / counts.finished
        if rate > gates.max_failure_rate:
            detail = f"failure rate {rate:.2f} over {gates.max_failure_rate:.2f} after {counts.finished} devices"
            return [*effects, *_halt(view, deployments, Gate.FAILURE_RATE, detail)]

    sizes = view.plan.stage_sizes(len(view.targets))
    stage_index = min(view.current_stage, len(sizes) - 1)
    stage = view.plan.stages[stage_index]
    if stage.requires_approval and stage_index not in view.approved_stages:
        return effects
    wanted = sizes[stage_index]
    due = tuple(sorted(d.device_id for d in deployments.values() if retry_due(d, view.plan, now)))
    if counts.assigned < wanted or due:
        if not view.plan.may_assign(now):
            return effects  # outside every maintenance window: wait
        slots = len(view.targets) if gates.max_concurrent is None else max(0, gates.max_concurrent - counts.active)
        # Retries go first: those devices are already part of the stage.
        retry = due[:slots]
        if retry:
            effects.append(Retry(retry))
        new = tuple(d for d in view.targets[:wanted] if d not in deployments)[: slots - len(retry)]
        if new:
            effects.append(Assign(new, stage_index))
        return effects
    if counts.in_progress:
        return effects
    if counts.committed < min(gates.min_devices, wanted):
        return [
            *effects,
            *_halt(
                view,
                deployments,
                Gate.MIN_DEVICES,
                f"only {counts.committed} devices committed, gate needs {gates.min_devices}",
            ),
        ]
    missing = not_evaluated(view.gate_results)
    if view.soak_started_at is None:
        # The soak's start also marks when a stage without soak began waiting for gate data.
        return (
            [*effects, StartSoak(now)]
            if stage.soak_seconds > 0 or missing
            else [*effects, *_advance(view, stage_index, len(sizes))]
        )
    waited = (now - view.soak_started_at).total_seconds()
    if waited < stage.soak_seconds:
        return effects
    if not missing:
        return [*effects, *_advance(view, stage_index, len(sizes))]
    return [*effects, *_missing_data(view, deployments, stage, stage_index, len(sizes), waited)]


def _missing_data(
    view: RolloutView,
    deployments: Mapping[str, DeploymentView],
    stage: Stage,
    stage_index: int,
    stage_count: int,
    waited: float,
) -> list[Effect]:
    """A soaked stage with gates not evaluated: wait for data, then fail (default) or pass saying so."""
    if waited < stage.soak_seconds + data_timeout_seconds(view.plan.gates, stage.soak_seconds):
        return []
    missing = not_evaluated(view.gate_results)
    detail = "; ".join(g.describe() for g in missing)
    if view.plan.on_missing_data == "fail":
        return _halt(view, deployments, Gate.NOT_EVALUATED, detail)
    return _advance(view, stage_index, stage_count)


def _advance(view: RolloutView, stage_index: int, stage_count: int) -> list[Effect]:
    """Pass the stage. A rollout never says "all stages passed" while a gate it sets was not evaluated."""
    missing = not_evaluated(view.gate_results)
    if stage_index + 1 >= stage_count:
        if missing:
            # Never "all stages passed": these gates never ran, and the plan chose to go on without them.
            detail = "stages passed with gates not evaluated (plan on_missing_data: pass): " + "; ".join(
                g.describe() for g in missing
            )
        else:
            evaluated = [g.name for g in view.gate_results]
            detail = "all stages passed" + (f" (gates passed: {', '.join(evaluated)})" if evaluated else "")
        return [SetState(RolloutState.COMPLETED, ReasonCode.OK, detail, gates=view.gate_results)]
    return [EnterStage(stage_index + 1, gates=view.gate_results)]


Command = Literal["start", "pause", "resume", "approve", "abort", "abort_revert", "rollback", "retry_failed"]

_NOT_TERMINAL = frozenset(s for s in RolloutState if not s.terminal)
COMMAND_FROM: Mapping[str, frozenset[RolloutState]] = {
    "start": frozenset({RolloutState.DRAFT, RolloutState.SCHEDULED}),
    "pause": frozenset({RolloutState.RUNNING}),
    "resume": frozenset({RolloutState.PAUSED}),
    "approve": _NOT_TERMINAL,
    "abort": _NOT_TERMINAL,
    "abort_revert": _NOT_TERMINAL,
    "rollback": frozenset({RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.COMPLETED, RolloutState.ABORTED}),
    "retry_failed": frozenset({RolloutState.RUNNING, RolloutState.PAUSED}),
}
"""The rollout states each operator command may start from (the rest raise :class:`TransitionError`)."""
SCHEDULE_FROM = frozenset({RolloutState.DRAFT})
"""Only a draft may be scheduled (``rollout create --start-at``)."""
_VERB = {
    "approve": "approve a stage of",
    "abort_revert": "abort",
    "rollback": "roll back",
    "retry_failed": "retry the failed devices of",
}


def _allowed(command: str, state: RolloutState) -> None:
    if state not in (SCHEDULE_FROM if command == "schedule" else COMMAND_FROM[command]):
        raise TransitionError(f"cannot {_VERB.get(command, command)} a rollout that is {state.value}")


def apply_command(view: RolloutView, command: Command, now: datetime | None = None) -> list[Effect]:
    """Effects of an operator command.

    Raises :class:`TransitionError` when :data:`COMMAND_FROM` does not allow ``command`` from the
    rollout's state, for ``approve`` when the current stage needs no approval, and for ``retry_failed`` when no
    device's latest attempt is ``failed``. ``retry_failed`` re-assigns every failed device a new attempt of the same
    bundle (:class:`Retry`, whatever the plan's ``max_retries``) and leaves the rollout's state as it is.
    """
    if command not in COMMAND_FROM:
        raise TransitionError(f"unknown command {command!r}")
    _allowed(command, view.state)
    if command == "start":
        return [SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "started"), EnterStage(0)]
    if command == "pause":
        return [SetState(RolloutState.PAUSED, ReasonCode.MANUAL, "paused")]
    if command == "resume":
        resumed: list[Effect] = [SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "resumed")]
        if view.halted_by == Gate.NOT_EVALUATED and view.soak_started_at is not None:
            resumed.append(StartSoak(now or datetime.now(UTC)))  # the gates get a full soak and data wait again
        return resumed
    if command == "approve":
        stage = view.plan.stages[min(view.current_stage, len(view.plan.stages) - 1)]
        if not stage.requires_approval:
            raise TransitionError(f"stage {view.current_stage} does not require approval")
        return [ApproveStage(view.current_stage)]
    if command == "retry_failed":
        # Only ``failed`` (not ``rolled_back``: the device itself judged the bundle bad); the rollout's state stays,
        # so a paused rollout runs the new attempts and the operator resumes when they look right.
        failed_ids = tuple(sorted(d.device_id for d in view.deployments.values() if d.state == DS.FAILED))
        if not failed_ids:
            raise TransitionError("the rollout has no failed devices to retry")
        return [Retry(failed_ids)]
    if command == "abort":
        pending = tuple(sorted(d.device_id for d in view.deployments.values() if d.state == DS.PENDING))
        cancel: list[Effect] = [CancelDeployments(pending)] if pending else []
        return [*cancel, SetState(RolloutState.ABORTED, ReasonCode.MANUAL, "aborted")]
    if command == "abort_revert":
        return [
            *revert_effects(view.deployments),
            SetState(RolloutState.ABORTED, ReasonCode.MANUAL, "aborted and reverted", revert_ordered=True),
        ]
    return [
        *revert_effects(view.deployments),
        SetState(RolloutState.ROLLED_BACK, ReasonCode.MANUAL, "rolled back", revert_ordered=True),
    ]


def schedule(view: RolloutView, start_at: datetime) -> list[Effect]:
    """Effects of scheduling a draft rollout to start at ``start_at``; TransitionError unless it is a draft."""
    _allowed("schedule", view.state)
    return [Schedule(start_at), SetState(RolloutState.SCHEDULED, ReasonCode.MANUAL, "scheduled")]
