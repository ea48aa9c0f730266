"""The effects of the rollout state machine: what :mod:`ota_server.rollout.engine_logic` decides.

Each effect is a frozen dataclass describing state, not an increment, so applying the same effects twice
changes nothing more (:mod:`ota_server.rollout.apply` persists them in one unit of work). Facts that later
decisions read are typed fields of :class:`SetState`, never words of its ``detail``: ``halted_by`` names the
gate that fired (:class:`Gate`), ``revert_ordered`` says that the devices were ordered back to their
previous bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from edgeota_contract.states import ReasonCode, RolloutState
from ota_server.rollout.gate_results import GateResult


class Gate(StrEnum):
    """The gate that halted a rollout (``Rollout.halted_by``)."""

    FAILURE_RATE = "failure_rate"
    MIN_DEVICES = "min_devices"
    TELEMETRY = "telemetry"
    NOT_EVALUATED = "not_evaluated"
    """A telemetry gate still lacked data when its stage's wait ended (plan ``on_missing_data: fail``)."""


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
    gates: tuple[GateResult, ...] = ()
    """The telemetry gates as judged when the previous stage passed (for the audit log)."""


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
    """Move the rollout to ``state``. ``detail`` is for people; decisions read the typed fields."""

    state: RolloutState
    reason: ReasonCode = ReasonCode.OK
    detail: str = ""
    halted_by: Gate | None = None
    """The gate that fired, when a gate halts the rollout."""
    revert_ordered: bool = False
    """The rollout's updated devices were ordered back to their previous bundle (``Rollout.reverted``)."""
    gates: tuple[GateResult, ...] = ()
    """The telemetry gates as judged when a gate halted or the last stage passed (for the audit log)."""


@dataclass(frozen=True)
class Schedule:
    """Start the rollout at ``at`` (the engine's tick starts it then)."""

    at: datetime


Effect = (
    Assign
    | TimeOut
    | Retry
    | EnterStage
    | StartSoak
    | ApproveStage
    | RevertDevices
    | CancelDeployments
    | SetState
    | Schedule
)
