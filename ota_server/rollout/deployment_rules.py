"""Deployment transitions: the rules as plain data, and one pure function per source of change.

Every change of a deployment's state is a :class:`Transition` effect naming one rule of :data:`RULES`
(allowed from-states, to-state, fixed reason); :mod:`ota_server.rollout.apply` checks the rule again
and is the only code that writes the row. The sources:

- the server's own moves (notify on send, supersede, time out, cancel, stop a shadow, a server-ordered
  revert landing): rules applied by :mod:`ota_server.rollout.deployments`;
- a device status report: :func:`on_status_report`;
- a device check-in, reconciled against what the server believes: :func:`on_checkin`.

The record of a server-ordered rollback (manual ``rollback``, a gate's rollback, ``abort --revert``):
when the server orders a device back, each of the rollout's install deployments on it gets
``reverted_by`` (the id of the rollback deployment) and keeps its state. Once the device runs the
previous bundle again, whichever message shows it first (the rollback deployment's ``committed``
report, or a check-in showing the older bundle, before, during or after that report), a committed
install moves to ``rolled_back`` with reason ``server_rollback``: the model was not found unhealthy
on the device. A halt orders back at once every device whose install was already sent, in flight
ones included: such an install is cancelled (``failed``/``cancelled``) and gets ``reverted_by`` too. The
device usually finishes it anyway (it never hears the cancel), then runs the rollback it queued meanwhile;
the install's late ``committed`` (:func:`is_late_commit`) finds the rollback deployment already there, so
no second one is made, and a cancelled install is never landed (it stays ``failed``). Only a committed
install with no ``reverted_by`` that a check-in shows replaced by an older bundle is ``rolled_back`` with
``health_failed`` (the device undid it by itself). Targeting
skips a device only for a ``rolled_back`` install whose reason is not ``server_rollback``
(:func:`ota_server.services.rollouts.compute_targeting`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgeota_contract.states import DeploymentState, ReasonCode, deployment_transition_allowed

DS = DeploymentState
_OPEN = frozenset(s for s in DS if not s.terminal)
_ANY = frozenset(DS)
LATE_COMMIT_REASONS = frozenset(
    {ReasonCode.CANCELLED.value, ReasonCode.DEVICE_TIMEOUT.value, ReasonCode.SUPERSEDED.value}
)
"""An install ``failed`` for one of these may still be finished by the device (it never heard the server)."""


@dataclass(frozen=True)
class Rule:
    """One allowed deployment transition.

    ``reason`` None: the event supplies it (a device report). ``guarded``: the move must also be
    progress by :func:`~edgeota_contract.states.deployment_transition_allowed` (reports are
    deduplicated and late or out-of-order ones ignored).
    """

    name: str
    from_states: frozenset[DeploymentState]
    to_state: DeploymentState | None
    """None: the event names the state (a device report)."""
    reason: ReasonCode | None = None
    guarded: bool = False


RULES: Mapping[str, Rule] = {
    r.name: r
    for r in (
        Rule("notify", frozenset({DS.PENDING}), DS.NOTIFIED),
        Rule("report", _ANY, None, guarded=True),
        Rule("supersede", _OPEN, DS.FAILED, ReasonCode.SUPERSEDED),
        Rule("time_out", _OPEN, DS.FAILED, ReasonCode.DEVICE_TIMEOUT),
        Rule("cancel", _OPEN, DS.FAILED, ReasonCode.CANCELLED),
        Rule("stop_shadow", _ANY - {DS.ROLLED_BACK}, DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK),
        Rule("server_rollback_landed", frozenset({DS.COMMITTED}), DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK),
        Rule("device_went_back", frozenset({DS.COMMITTED}), DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED),
        Rule("checkin_active", _OPEN, None, guarded=True),
        Rule("checkin_runs_it", _OPEN, DS.COMMITTED, ReasonCode.OK),
    )
}
"""Every deployment transition there is. The applier refuses a transition its rule does not allow."""


def allows(rule: Rule, current: DeploymentState, new: DeploymentState) -> bool:
    """Whether ``rule`` may move a deployment from ``current`` to ``new``."""
    if current not in rule.from_states or (rule.to_state is not None and new != rule.to_state):
        return False
    return deployment_transition_allowed(current, new) if rule.guarded else current != new


def apply_report(current: DeploymentState, reported: DeploymentState) -> DeploymentState | None:
    """The deployment's new state after a device report, or None for a stale/duplicate report."""
    return reported if allows(RULES["report"], current, reported) else None


# ------------------------------------------------------------------ plain views


@dataclass(frozen=True)
class DeploymentFacts:
    """What the rules read of one deployment row."""

    id: str
    device_id: str
    mode: str
    model_name: str
    version: str
    bundle_sha256: str
    release_counter: int
    state: DeploymentState
    reason: str = ReasonCode.OK.value
    reverted_by: str | None = None
    """The rollback deployment the server ordered for this install (set when it ordered it)."""
    rollout_revert_ordered: bool = False
    """This deployment's rollout ordered its updated devices reverted (``Rollout.reverted``)."""


@dataclass(frozen=True)
class RunningFacts:
    """One model as a check-in shows it running on the device."""

    model_name: str
    version: str
    bundle_sha256: str
    release_counter: int
    serving: bool
    shadow_version: str | None = None


# ------------------------------------------------------------------ effects


@dataclass(frozen=True)
class Transition:
    """Move deployment ``deployment_id`` by ``rule``; ``state``/``reason``/``detail`` None keep what is there."""

    deployment_id: str
    rule: str
    state: DeploymentState
    reason: ReasonCode | str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class RecordRunning:
    """The device runs ``bundle_sha256`` now (update its model record)."""

    device_id: str
    bundle_sha256: str


@dataclass(frozen=True)
class RevertLate:
    """The device finished an install after its rollout ordered a revert: revert this device too."""

    deployment_id: str


@dataclass(frozen=True)
class Resend:
    """Send these open deployments again (fresh assignment ids)."""

    deployment_ids: tuple[str, ...]


DeploymentEffect = Transition | RecordRunning | RevertLate | Resend


@dataclass(frozen=True)
class ReportOutcome:
    effects: list[DeploymentEffect]
    ignored: str | None = None
    """``stale`` for a report that is not progress (it is still stored in the history)."""


def is_late_commit(dep: DeploymentFacts) -> bool:
    """An install the server had given up on (cancelled, timed out, superseded)."""
    return dep.mode == "install" and dep.state == DS.FAILED and dep.reason in LATE_COMMIT_REASONS


def on_status_report(
    dep: DeploymentFacts,
    reported: DeploymentState,
    reason: ReasonCode | str,
    detail: str,
    reverted: Sequence[DeploymentFacts] = (),
) -> ReportOutcome:
    """The effects of a device's status report on its deployment ``dep``.

    ``reverted``: the install deployments whose ``reverted_by`` is ``dep`` (when ``dep`` is a server
    rollback). Guarantees: a duplicate, late or out-of-order report changes nothing (``stale``); a late
    ``committed`` of an install the server gave up on records the running bundle and, when the rollout
    ordered a revert, reverts the device (:class:`RevertLate`); a rollback deployment reaching
    ``committed`` lands each committed install it reverts as ``rolled_back``/``server_rollback``.
    """
    new = apply_report(dep.state, reported)
    if new is None:
        effects: list[DeploymentEffect] = []
        if reported == DS.COMMITTED and is_late_commit(dep):
            effects.append(RecordRunning(dep.device_id, dep.bundle_sha256))
            if dep.rollout_revert_ordered:
                effects.append(RevertLate(dep.id))
        return ReportOutcome(effects, "stale")
    effects = [Transition(dep.id, "report", new, reason, detail)]
    if new == DS.COMMITTED and dep.mode != "shadow":
        effects.append(RecordRunning(dep.device_id, dep.bundle_sha256))
        if dep.mode == "rollback":
            effects.extend(_landed(reverted, f"rolled back by the server to {dep.version}"))
    return ReportOutcome(effects)


def _landed(reverted: Sequence[DeploymentFacts], detail: str) -> list[DeploymentEffect]:
    return [
        Transition(d.id, "server_rollback_landed", DS.ROLLED_BACK, ReasonCode.SERVER_ROLLBACK, detail)
        for d in reverted
        if d.state == DS.COMMITTED
    ]


def on_checkin(
    deployments: Sequence[DeploymentFacts],
    running: Mapping[str, RunningFacts],
    active_deployment_id: str | None,
    active_state: DeploymentState | None,
) -> list[DeploymentEffect]:
    """Reconcile a device's deployments with what its (not stale) check-in shows it running.

    Per deployment: a late commit the rollout wants reverted is reverted (:class:`RevertLate`); a
    committed install the device no longer runs, replaced by an older bundle, becomes ``rolled_back``
    (``server_rollback`` when the server ordered that rollback, see the module docstring, else
    ``health_failed``); the active deployment takes the check-in's state if it is progress; an open one
    the device already runs is ``committed`` ("reconciled from check-in"), unless the device is busy with
    another deployment of that model (a rollback queued behind a cancelled install it still finishes: it has
    not run yet, and the install may yet replace what the device runs); the rest still open are sent again
    (one :class:`Resend`, last).
    """
    effects: list[DeploymentEffect] = []
    resend: list[str] = []
    # Models the device is still changing: it runs another install of them (a cancelled one it finishes anyway,
    # say), so what it runs now may not last, and a deployment queued behind is not done yet. (A shadow does not
    # change what the device serves.)
    busy = {
        d.model_name
        for d in deployments
        if active_deployment_id is not None and d.id == active_deployment_id and d.mode != "shadow"
    }
    for dep in deployments:
        state = dep.state
        model = running.get(dep.model_name)
        if dep.mode == "shadow":
            runs_it = model is not None and model.shadow_version == dep.version
        else:
            runs_it = model is not None and model.bundle_sha256 == dep.bundle_sha256 and model.serving
        is_active = active_deployment_id == dep.id
        if state.terminal:
            if runs_it and is_late_commit(dep):
                if dep.rollout_revert_ordered:
                    effects.append(RevertLate(dep.id))
            elif (
                state == DS.COMMITTED
                and dep.mode == "install"
                and model is not None
                and not runs_it
                and not is_active
                and dep.release_counter > model.release_counter
            ):
                shows = f"device check-in shows {model.version} running"
                if dep.reverted_by is not None:
                    effects.extend(_landed([dep], f"rolled back by the server; {shows}"))
                else:
                    effects.append(
                        Transition(dep.id, "device_went_back", DS.ROLLED_BACK, ReasonCode.HEALTH_FAILED, shows)
                    )
            continue
        if is_active and active_state is not None:
            new = apply_report(state, active_state)
            if new is not None:
                effects.append(Transition(dep.id, "checkin_active", new))
                state = new
        if runs_it and not is_active and state != DS.COMMITTED and dep.model_name not in busy:
            effects.append(
                Transition(dep.id, "checkin_runs_it", DS.COMMITTED, ReasonCode.OK, "reconciled from check-in")
            )
            continue
        if not state.terminal:
            resend.append(dep.id)
    if resend:
        effects.append(Resend(tuple(resend)))
    return effects
