"""The rollout state machine: pure transition functions over plain data.

:func:`decide` looks at a running rollout and the deployments it has made and returns the
effects to apply (assign devices, time deployments out, advance, complete, pause, roll back).
:func:`apply_command` does the same for a manual command. Neither does any I/O, so the engine
can be tested by feeding views and events; the caller persists the effects in one transaction.
Applying the effects and calling again is idempotent: effects describe state, not increments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState, deployment_transition_allowed
from ota_server.rollout.plan import Plan

DS = DeploymentState
UPDATED_STATES = frozenset({DS.INSTALLING, DS.TRIAL, DS.COMMITTED})
"""Deployment states in which the device may already run the new bundle (so rollback must revert it)."""
FAILED_STATES = frozenset({DS.FAILED, DS.ROLLED_BACK})
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


class TransitionError(EdgeotaError):
    """A manual command that the rollout's current state does not allow."""

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
    telemetry_failure: str | None = None
    """Why the release's telemetry fails a gate (see telemetry_gates), or None."""


# ------------------------------------------------------------------ effects


@dataclass(frozen=True)
class Assign:
    device_ids: tuple[str, ...]
    stage: int


@dataclass(frozen=True)
class TimeOut:
    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class Retry:
    """Re-assign each device a new attempt (a new deployment) of the same bundle; the failed one stays in history."""

    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class EnterStage:
    stage: int


@dataclass(frozen=True)
class StartSoak:
    at: datetime


@dataclass(frozen=True)
class ApproveStage:
    stage: int


@dataclass(frozen=True)
class RevertDevices:
    """Send each device a rollback to the bundle it ran before this rollout."""

    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class CancelDeployments:
    """Stop deployments not yet running the new bundle (state -> failed, reason cancelled)."""

    device_ids: tuple[str, ...]


@dataclass(frozen=True)
class SetState:
    state: RolloutState
    reason: ReasonCode = ReasonCode.OK
    detail: str = ""


Effect = Assign | TimeOut | Retry | EnterStage | StartSoak | ApproveStage | RevertDevices | CancelDeployments | SetState


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

    @property
    def finished(self) -> int:
        return self.committed + self.failed


def will_retry(d: DeploymentView, max_retries: int) -> bool:
    """True when ``d`` failed for a transient reason and has attempts left."""
    return d.state == DS.FAILED and d.reason in RETRYABLE_REASONS and d.attempt <= max_retries


def count(deployments: Mapping[str, DeploymentView], max_retries: int = 0) -> Counts:
    committed = sum(1 for d in deployments.values() if d.state == DS.COMMITTED)
    failed = sum(1 for d in deployments.values() if d.state in FAILED_STATES and not will_retry(d, max_retries))
    active = sum(1 for d in deployments.values() if not d.state.terminal)
    return Counts(len(deployments), committed, failed, len(deployments) - committed - failed, active)


def retry_due(d: DeploymentView, plan: Plan, now: datetime) -> bool:
    """A retry waits ``retry_backoff_seconds * 2 ** (attempt - 1)`` after the failed attempt's last change."""
    backoff = plan.retry_backoff_seconds * 2 ** (d.attempt - 1)
    return will_retry(d, plan.max_retries) and (now - d.last_change).total_seconds() >= backoff


def _halt(view: RolloutView, deployments: Mapping[str, DeploymentView], detail: str) -> list[Effect]:
    if view.plan.on_failure == "pause":
        return [SetState(RolloutState.PAUSED, ReasonCode.GATE_FAILED, detail)]
    return [*_revert(deployments), SetState(RolloutState.ROLLED_BACK, ReasonCode.GATE_FAILED, detail)]


def _revert(deployments: Mapping[str, DeploymentView]) -> list[Effect]:
    revert = tuple(sorted(d.device_id for d in deployments.values() if d.state in UPDATED_STATES))
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

    if view.telemetry_failure:
        return [*effects, *_halt(view, deployments, view.telemetry_failure)]
    counts = count(deployments, view.plan.max_retries)
    if counts.finished >= max(1, gates.min_count_for_failure_rate):
        rate = counts.failed / counts.finished
        if rate > gates.max_failure_rate:
            detail = f"failure rate {rate:.2f} over {gates.max_failure_rate:.2f} after {counts.finished} devices"
            return [*effects, *_halt(view, deployments, detail)]

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
            *_halt(view, deployments, f"only {counts.committed} devices committed, gate needs {gates.min_devices}"),
        ]
    if view.soak_started_at is None:
        return (
            [*effects, StartSoak(now)]
            if stage.soak_seconds > 0
            else [*effects, *_advance(view, stage_index, len(sizes))]
        )
    if (now - view.soak_started_at).total_seconds() >= stage.soak_seconds:
        return [*effects, *_advance(view, stage_index, len(sizes))]
    return effects


def _advance(view: RolloutView, stage_index: int, stage_count: int) -> list[Effect]:
    if stage_index + 1 >= stage_count:
        return [SetState(RolloutState.COMPLETED, ReasonCode.OK, "all stages passed")]
    return [EnterStage(stage_index + 1)]


Command = Literal["start", "pause", "resume", "approve", "abort", "abort_revert", "rollback"]


def apply_command(view: RolloutView, command: Command) -> list[Effect]:
    """Effects of a manual command; raises TransitionError when the state does not allow it."""
    state = view.state
    if command == "start":
        if state not in (RolloutState.DRAFT, RolloutState.SCHEDULED):
            raise TransitionError(f"cannot start a rollout that is {state.value}")
        return [SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "started"), EnterStage(0)]
    if command == "pause":
        if state != RolloutState.RUNNING:
            raise TransitionError(f"cannot pause a rollout that is {state.value}")
        return [SetState(RolloutState.PAUSED, ReasonCode.MANUAL, "paused")]
    if command == "resume":
        if state != RolloutState.PAUSED:
            raise TransitionError(f"cannot resume a rollout that is {state.value}")
        return [SetState(RolloutState.RUNNING, ReasonCode.MANUAL, "resumed")]
    if command == "approve":
        if state not in (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.DRAFT, RolloutState.SCHEDULED):
            raise TransitionError(f"cannot approve a stage of a rollout that is {state.value}")
        stage = view.plan.stages[min(view.current_stage, len(view.plan.stages) - 1)]
        if not stage.requires_approval:
            raise TransitionError(f"stage {view.current_stage} does not require approval")
        return [ApproveStage(view.current_stage)]
    if command in ("abort", "abort_revert"):
        if state.terminal:
            raise TransitionError(f"cannot abort a rollout that is {state.value}")
        pending = tuple(sorted(d.device_id for d in view.deployments.values() if d.state == DS.PENDING))
        effects: list[Effect] = []
        if command == "abort_revert":
            effects.extend(_revert(view.deployments))
        elif pending:
            effects.append(CancelDeployments(pending))
        detail = "aborted and reverted" if command == "abort_revert" else "aborted"
        return [*effects, SetState(RolloutState.ABORTED, ReasonCode.MANUAL, detail)]
    if command == "rollback":
        if state in (RolloutState.ROLLED_BACK, RolloutState.DRAFT, RolloutState.SCHEDULED):
            raise TransitionError(f"cannot roll back a rollout that is {state.value}")
        return [*_revert(view.deployments), SetState(RolloutState.ROLLED_BACK, ReasonCode.MANUAL, "rolled back")]
    raise TransitionError(f"unknown command {command!r}")


def apply_report(current: DeploymentState, reported: DeploymentState) -> DeploymentState | None:
    """The deployment's new state after a device report, or None for a stale/duplicate report."""
    return reported if deployment_transition_allowed(current, reported) else None
