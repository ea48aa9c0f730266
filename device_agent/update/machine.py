"""The device update state machine as pure transitions over plain data.

A :class:`Deployment` names the step that is about to run (or was running when the process
died). Events move it on: :func:`on_success`, :func:`on_failure` and :func:`on_boot` return a
:class:`Transition` holding the next record and the status reports to send. Nothing here does
I/O, so tests can drive every path, including a crash before any step, one event at a time.

Happy path::

    verify_assignment -> check_disk -> download -> check_digest -> verify_bundle -> smoke_test
      -> switch -> trial -> commit -> done (committed)

A failure before the switch goes to ``abort`` (clean up, report ``failed``); a failure in or
after the trial goes to ``rollback`` (previous slot back, report ``rolled_back``). A boot in the
middle of a step resumes it (every step is idempotent), except ``trial``: each boot there
counts, and after ``max_boot_attempts`` boots the model is rolled back (``crash_loop``).

A shadow deployment (``mode="shadow"``) stages into the ``shadow`` slot and goes from ``switch``
(which starts shadowing instead of serving) straight to ``commit``.

A server-ordered rollback (``mode="rollback"``) never ends on the release it rolls back from: a failure
after its switch ends it ``failed`` while the rollback's bundle keeps serving (``abort`` keeps the active
slot), and a crash loop in its trial commits it: the release it goes back to is not what kills the agent
(the bad one, still in the other slot, may well be). ``known_good`` marks a rollback to a bundle this
device committed before; its trial is a short probe (:func:`device_agent.update.trial.trial_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState, ReasonCode


class Step(StrEnum):
    VERIFY_ASSIGNMENT = "verify_assignment"
    CHECK_DISK = "check_disk"
    DOWNLOAD = "download"
    CHECK_DIGEST = "check_digest"
    VERIFY_BUNDLE = "verify_bundle"
    SMOKE_TEST = "smoke_test"
    SWITCH = "switch"
    TRIAL = "trial"
    COMMIT = "commit"
    ABORT = "abort"
    ROLLBACK = "rollback"
    DONE = "done"


HAPPY_PATH: tuple[Step, ...] = (
    Step.VERIFY_ASSIGNMENT,
    Step.CHECK_DISK,
    Step.DOWNLOAD,
    Step.CHECK_DIGEST,
    Step.VERIFY_BUNDLE,
    Step.SMOKE_TEST,
    Step.SWITCH,
    Step.TRIAL,
    Step.COMMIT,
)
BEFORE_SWITCH = frozenset(HAPPY_PATH[: HAPPY_PATH.index(Step.SWITCH) + 1])
NAMED_STEPS: tuple[Step, ...] = (*HAPPY_PATH, Step.ABORT, Step.ROLLBACK)
"""Every step an executor runs (and a crash hook can stop at)."""

# Status reported when a step completes successfully.
_REPORT_AFTER: dict[Step, tuple[DeploymentState, ...]] = {
    Step.CHECK_DISK: (DeploymentState.DOWNLOADING,),
    Step.CHECK_DIGEST: (DeploymentState.DOWNLOADED, DeploymentState.VERIFYING),
    Step.VERIFY_BUNDLE: (DeploymentState.INSTALLING,),
    Step.SWITCH: (DeploymentState.TRIAL,),
    Step.COMMIT: (DeploymentState.COMMITTED,),
}


class Deployment(BaseModel):
    """One deployment on this device, persisted in the agent's state file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    assignment: Assignment
    step: Step = Step.VERIFY_ASSIGNMENT
    target_slot: str
    previous_slot: str | None = None
    boot_attempts: int = 0
    outcome: DeploymentState | None = None
    reason: ReasonCode = ReasonCode.OK
    detail: str = ""
    deferred_since: datetime | None = None  # when the application first deferred the switch (survives restarts)
    known_good: bool = False  # a rollback to a bundle committed on this device before: short probe, no full trial

    @property
    def deployment_id(self) -> str:
        return self.assignment.deployment_id

    @property
    def done(self) -> bool:
        return self.step == Step.DONE


@dataclass(frozen=True)
class Report:
    state: DeploymentState
    reason: ReasonCode = ReasonCode.OK
    detail: str = ""


@dataclass(frozen=True)
class Transition:
    deployment: Deployment
    reports: tuple[Report, ...] = field(default_factory=tuple)


def start(
    assignment: Assignment, target_slot: str, previous_slot: str | None, *, known_good: bool = False
) -> Deployment:
    """A new deployment that will stage into ``target_slot`` (the inactive one). ``known_good`` is honoured
    only for a rollback."""
    return Deployment(
        assignment=assignment,
        target_slot=target_slot,
        previous_slot=previous_slot,
        known_good=known_good and assignment.mode == "rollback",
    )


def _move(dep: Deployment, **changes: object) -> Deployment:
    return dep.model_copy(update=changes)


def on_success(dep: Deployment) -> Transition:
    """The current step finished. Raises ValueError for a finished deployment."""
    step = dep.step
    if step == Step.DONE:
        raise ValueError("deployment already finished")
    if step in (Step.ABORT, Step.ROLLBACK):
        assert dep.outcome is not None
        return Transition(_move(dep, step=Step.DONE), (Report(dep.outcome, dep.reason, dep.detail),))
    if step == Step.COMMIT:
        nxt = _move(dep, step=Step.DONE, outcome=DeploymentState.COMMITTED)
        return Transition(nxt, tuple(Report(s) for s in _REPORT_AFTER[step]))
    if step == Step.SWITCH and dep.assignment.mode == "shadow":
        # A shadow candidate never serves: no trial; it is committed once it is loaded and shadowing.
        return Transition(_move(dep, step=Step.COMMIT))
    following = HAPPY_PATH[HAPPY_PATH.index(step) + 1]
    changes: dict[str, object] = {"step": following}
    if step == Step.SWITCH:
        changes["boot_attempts"] = 1
    return Transition(_move(dep, **changes), tuple(Report(s) for s in _REPORT_AFTER.get(step, ())))


def on_failure(dep: Deployment, reason: ReasonCode, detail: str = "") -> Transition:
    """The current step failed with ``reason``: abort before the switch, roll back after it."""
    detail = detail[:1000]
    if dep.step == Step.DONE:
        raise ValueError("deployment already finished")
    if dep.step in (Step.ABORT, Step.ROLLBACK):
        # Cleanup failed: finish anyway; the outcome and reason stay those of the first failure.
        return on_success(dep)
    if dep.step in BEFORE_SWITCH or dep.assignment.mode == "rollback":
        # A rollback's bundle stays active after a failure past its switch: switching back would serve
        # the very release the server ordered the device away from (abort keeps an active slot).
        nxt = _move(dep, step=Step.ABORT, outcome=DeploymentState.FAILED, reason=reason, detail=detail)
    else:
        nxt = _move(dep, step=Step.ROLLBACK, outcome=DeploymentState.ROLLED_BACK, reason=reason, detail=detail)
    return Transition(nxt)


def on_boot(dep: Deployment, max_boot_attempts: int) -> Transition:
    """The agent restarted while ``dep`` was at its step: resume it, or roll back a crash-looping trial."""
    if dep.step == Step.TRIAL:
        attempts = dep.boot_attempts + 1
        if attempts > max_boot_attempts and dep.assignment.mode == "rollback":
            # Not the known-good model's fault: keep it and commit (never return to the bad release).
            return Transition(_move(dep, step=Step.COMMIT, boot_attempts=attempts))
        if attempts > max_boot_attempts:
            return on_failure(
                _move(dep, boot_attempts=attempts),
                ReasonCode.CRASH_LOOP,
                f"agent restarted {attempts - 1} times during the trial",
            )
        return Transition(_move(dep, boot_attempts=attempts))
    return Transition(dep)
