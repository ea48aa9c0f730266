"""Persisting a bandit rollout's effects onto rows, inside the caller's unit of work.

:func:`apply_bandit_effects` applies what :func:`ota_server.rollout.bandit_logic.decide_bandit` returns: the
bandit's own effects here, the effects it shares with staged rollouts through
:func:`ota_server.rollout.apply.apply_effects`. New deployments go into the unit's outbox (published after the
commit). Guarantees:

- A device is placed on or moved to an arm by a new install deployment of that arm's release (one attempt per
  placement: a move marks the device's previous attempt ``retried``, so each device has exactly one latest
  attempt, the one the engine reads). A move is audited (``rollout.bandit.move``: device, from, to, cause).
- A new attempt's ``previous_bundle_sha256`` is the bundle the device ran before the rollout (its first
  attempt's previous bundle, else its first arm's bundle), so a rollback of the rollout returns each device there.
- An install below the release counter the device runs gets ``allow_downgrade`` (sent as mode ``rollback``,
  see :func:`ota_server.services.dispatch.wire_mode`); the committed attempt it replaces gets ``reverted_by``,
  so a check-in showing the older arm records it ``rolled_back``/``server_rollback``, not a device failure.
- :func:`change_arm` is the only writer of an arm's state, by :data:`~ota_server.rollout.bandit_logic.ARM_RULES`
  (audited ``rollout.bandit.arm_<state>``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.logs import log_event
from edgeota_contract.states import DeploymentState
from ota_server.models import BanditStep, Bundle, Deployment, DeviceModel, Release, Rollout, RolloutArm
from ota_server.rollout import bandit_logic as bl
from ota_server.rollout import deployments as deps
from ota_server.rollout.apply import apply_effects
from ota_server.rollout.bandit import Move
from ota_server.rollout.unit_of_work import Outbox
from ota_server.services import audit

log = logging.getLogger("edgeota.server.rollout")


def apply_bandit_effects(
    session: Session, rollout: Rollout, effects: Sequence[bl.AnyEffect], actor: str, now: datetime, outbox: Outbox
) -> None:
    """Persist a bandit rollout's effects (the caller's unit of work commits)."""
    for effect in effects:
        if isinstance(effect, bl.AssignArm):
            outbox.deployments.extend(place(session, rollout, effect.release_id, effect.device_ids, actor, now))
        elif isinstance(effect, bl.MoveDevices):
            outbox.deployments.extend(move_devices(session, rollout, effect, actor, now))
        elif isinstance(effect, bl.ChangeArm):
            change_arm(session, rollout, effect, actor, now)
        elif isinstance(effect, bl.RecordStep):
            record_step(session, rollout, effect)
        else:
            apply_effects(session, rollout, [effect], actor, now, outbox)
    rollout.updated_at = now


def latest_attempts(
    session: Session, rollout_id: str, device_ids: Iterable[str] | None = None
) -> dict[str, Deployment]:
    """Each device's latest install attempt in the rollout (``retried`` false)."""
    stmt = select(Deployment).where(
        Deployment.rollout_id == rollout_id, Deployment.mode == "install", Deployment.retried.is_(False)
    )
    if device_ids is not None:
        stmt = stmt.where(Deployment.device_id.in_(list(device_ids)))
    return {d.device_id: d for d in session.scalars(stmt)}


def _running_counters(session: Session, device_ids: Sequence[str], model_name: str) -> dict[str, int]:
    rows = session.execute(
        select(DeviceModel.device_id, DeviceModel.release_counter).where(
            DeviceModel.device_id.in_(device_ids), DeviceModel.model_name == model_name
        )
    )
    return {device: int(counter) for device, counter in rows}


def _original_bundle(session: Session, rollout_id: str, device_id: str) -> str | None:
    """What the device ran before the rollout: its first attempt's previous bundle, else that attempt's bundle."""
    first = session.scalar(
        select(Deployment)
        .where(Deployment.rollout_id == rollout_id, Deployment.mode == "install", Deployment.device_id == device_id)
        .order_by(Deployment.attempt)
        .limit(1)
    )
    if first is None:
        return None
    return first.previous_bundle_sha256 or first.bundle_sha256


def place(
    session: Session,
    rollout: Rollout,
    release_id: str,
    device_ids: Sequence[str],
    actor: str,
    now: datetime,
    attempts: dict[str, int] | None = None,
    originals: dict[str, str | None] | None = None,
) -> list[str]:
    """New attempts of ``release_id`` for ``device_ids`` (attempt 1 unless ``attempts`` says); ids to send."""
    release = session.get(Release, release_id)
    if release is None or not device_ids:
        return []
    counters = _running_counters(session, device_ids, release.model_name)
    new_ids: list[str] = []
    groups: dict[int, list[str]] = {}
    for device in device_ids:
        groups.setdefault((attempts or {}).get(device, 1), []).append(device)
    for attempt, group in groups.items():
        new_ids.extend(deps.assign(session, rollout, tuple(group), 0, actor, now, attempt, release_id))
    for device, dep in latest_attempts(session, rollout.id, device_ids).items():
        running = counters.get(device)
        if dep.state != DeploymentState.COMMITTED.value and running is not None and dep.release_counter < running:
            dep.allow_downgrade = True
        if originals is not None and originals.get(device) is not None:
            dep.previous_bundle_sha256 = originals[device]
    session.flush()
    return new_ids


def _arm_of_bundles(session: Session, rollout_id: str) -> dict[str, str]:
    """Bundle sha -> arm release id, for every arm of the rollout."""
    arms = select(RolloutArm.release_id).where(RolloutArm.rollout_id == rollout_id)
    rows = session.execute(select(Bundle.sha256, Bundle.release_id).where(Bundle.release_id.in_(arms)))
    return {sha: release for sha, release in rows}


def move_devices(session: Session, rollout: Rollout, effect: bl.MoveDevices, actor: str, now: datetime) -> list[str]:
    """Move each device whose latest attempt is still on the move's from-arm; returns the ids to send."""
    arm_of = _arm_of_bundles(session, rollout.id)
    latest = latest_attempts(session, rollout.id, [m.device_id for m in effect.moves])
    versions = dict(
        session.execute(
            select(Release.id, Release.version).where(
                Release.id.in_({m.to_arm for m in effect.moves} | set(arm_of.values()))
            )
        ).all()
    )
    done: list[Move] = []
    new_ids: list[str] = []
    for move in effect.moves:
        old = latest.get(move.device_id)
        if old is None or arm_of.get(old.bundle_sha256) != move.from_arm:
            continue  # the device changed since the decision: leave it
        original = _original_bundle(session, rollout.id, move.device_id)
        old.retried = True
        session.flush()  # the new attempt must not meet this one as "the latest"
        ids = place(
            session,
            rollout,
            move.to_arm,
            [move.device_id],
            actor,
            now,
            {move.device_id: old.attempt + 1},
            {move.device_id: original},
        )
        new = latest_attempts(session, rollout.id, [move.device_id]).get(move.device_id)
        if (
            new is not None
            and old.state == DeploymentState.COMMITTED.value
            and new.release_counter < old.release_counter
        ):
            old.reverted_by = new.id  # the server ordered the device back to an older release: not a device failure
        new_ids.extend(ids)
        done.append(move)
    if done:
        audit.record(
            session,
            actor,
            "rollout.bandit.move",
            "rollout",
            rollout.id,
            None,
            {
                "cause": effect.cause,
                "moves": [
                    {
                        "device_id": m.device_id,
                        "from": versions.get(m.from_arm, m.from_arm),
                        "to": versions.get(m.to_arm, m.to_arm),
                    }
                    for m in done
                ],
            },
            f"moved {len(done)} devices ({effect.cause})",
        )
    session.flush()
    return new_ids


def change_arm(session: Session, rollout: Rollout, effect: bl.ChangeArm, actor: str, now: datetime) -> bool:
    """Move an arm by its rule; False (unchanged, logged) when the rule does not allow it from the arm's state."""
    arm = session.scalar(
        select(RolloutArm).where(RolloutArm.rollout_id == rollout.id, RolloutArm.release_id == effect.release_id)
    )
    rule = bl.ARM_RULES[effect.rule]
    if arm is None or arm.state not in rule.from_states:
        log_event(log, "arm_transition_refused", logging.DEBUG, rollout=rollout.id, rule=effect.rule)
        return False
    before: dict[str, Any] = {"release_id": arm.release_id, "state": arm.state}
    arm.state = rule.to_state
    arm.reason = effect.gate.value if effect.gate is not None else effect.rule
    arm.detail = effect.detail
    if rule.to_state != "winner":
        arm.ended_at = now
    if effect.gates:
        arm.gate_results = [g.as_json() for g in effect.gates]
    arm.updated_at = now
    after: dict[str, Any] = {"release_id": arm.release_id, "state": arm.state, "reason": arm.reason}
    if effect.gates:
        after["gates"] = arm.gate_results
    audit.record(
        session, actor, f"rollout.bandit.arm_{rule.to_state}", "rollout", rollout.id, before, after, effect.detail
    )
    return True


def record_step(session: Session, rollout: Rollout, effect: bl.RecordStep) -> None:
    """Append the step to ``bandit_steps`` and keep its figures on the arms' rows (for the status API)."""
    arms = {a.release_id: a for a in session.scalars(select(RolloutArm).where(RolloutArm.rollout_id == rollout.id))}
    figures: list[dict[str, Any]] = []
    for f in effect.arms:
        figures.append(
            {
                "release_id": f.release_id,
                "alpha": f.posterior.alpha,
                "beta": f.posterior.beta,
                "rewards": f.posterior.count,
                "reward_sum": f.posterior.total,
                "prob_best": f.prob_best,
                "low": f.low,
                "high": f.high,
                "target_share": f.target_share,
                "devices": f.placed,
            }
        )
        arm = arms.get(f.release_id)
        if arm is not None:
            arm.alpha, arm.beta = f.posterior.alpha, f.posterior.beta
            arm.rewards, arm.reward_sum = f.posterior.count, f.posterior.total
            arm.prob_best, arm.target_share, arm.devices = f.prob_best, f.target_share, f.placed
            arm.updated_at = effect.at
    session.add(
        BanditStep(
            rollout_id=rollout.id,
            step=effect.step,
            at=effect.at,
            seed=effect.seed,
            arms=figures,
            moves=[{"device_id": m.device_id, "from": m.from_arm, "to": m.to_arm} for m in effect.moves],
            leader=effect.leader,
            leader_since=effect.leader_since,
        )
    )
    session.flush()
