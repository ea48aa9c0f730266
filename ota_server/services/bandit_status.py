"""A bandit rollout's allocation as the status API shows it (the ``bandit`` section of a rollout's status).

Per arm: its release and version, state (``active``, ``dropped``, ``winner``, ``retired``) with the reason and
detail of its end, the devices whose latest attempt is on it (``devices``: not failed; of them ``committed`` and
``in_progress``; ``failed`` apart), its ``share`` of the placed devices, the last step's ``target_share``,
``prob_best``, rewards counted (``rewards``, their sum ``reward_sum``) and the Beta posterior (``alpha``,
``beta``, ``mean``, the central 95% interval ``low``..``high`` from the step's draws), and the telemetry gates as
last judged on that arm. Top level: the configuration, the step count, the last step's time and seed, the arm
leading toward a win and since when, the winner (if any) and the devices moved so far by steps.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState
from ota_server.models import BanditStep, Bundle, Deployment, Release, RolloutArm
from ota_server.rollout.bandit import BanditConfig

_FAILED = {DeploymentState.FAILED.value, DeploymentState.ROLLED_BACK.value}


def bandit_status(session: Session, rollout_id: str, plan: dict[str, Any]) -> dict[str, Any]:
    """The ``bandit`` section of a bandit rollout's status (see the module docstring)."""
    config = BanditConfig.from_json(plan.get("bandit", {}))
    arms = list(
        session.scalars(select(RolloutArm).where(RolloutArm.rollout_id == rollout_id).order_by(RolloutArm.position))
    )
    versions = dict(
        session.execute(select(Release.id, Release.version).where(Release.id.in_([a.release_id for a in arms]))).all()
    )
    by_arm: dict[str, dict[str, int]] = {a.release_id: {} for a in arms}
    rows = session.execute(
        select(Bundle.release_id, Deployment.state, func.count())
        .join(Bundle, Bundle.sha256 == Deployment.bundle_sha256)
        .where(Deployment.rollout_id == rollout_id, Deployment.mode == "install", Deployment.retried.is_(False))
        .group_by(Bundle.release_id, Deployment.state)
    )
    for release_id, state, n in rows:
        if release_id in by_arm:
            by_arm[release_id][state] = by_arm[release_id].get(state, 0) + int(n)
    steps = session.execute(
        select(BanditStep.step, BanditStep.at, BanditStep.seed, BanditStep.arms, BanditStep.leader)
        .add_columns(BanditStep.leader_since)
        .where(BanditStep.rollout_id == rollout_id)
        .order_by(BanditStep.step.desc())
        .limit(1)
    ).first()
    moved = sum(
        len(m or []) for m in session.scalars(select(BanditStep.moves).where(BanditStep.rollout_id == rollout_id))
    )
    intervals = {str(a["release_id"]): a for a in (steps.arms if steps is not None else [])}
    placed_total = sum(sum(n for s, n in counts.items() if s not in _FAILED) for counts in by_arm.values())
    out_arms: list[dict[str, Any]] = []
    for arm in arms:
        counts = by_arm[arm.release_id]
        devices = sum(n for s, n in counts.items() if s not in _FAILED)
        committed = counts.get(DeploymentState.COMMITTED.value, 0)
        step_arm = intervals.get(arm.release_id, {})
        out_arms.append(
            {
                "release_id": arm.release_id,
                "version": versions.get(arm.release_id, ""),
                "position": arm.position,
                "state": arm.state,
                "reason": arm.reason,
                "detail": arm.detail,
                "devices": devices,
                "committed": committed,
                "in_progress": devices - committed,
                "failed": sum(n for s, n in counts.items() if s in _FAILED),
                "share": devices / placed_total if placed_total else None,
                "target_share": arm.target_share,
                "prob_best": arm.prob_best,
                "rewards": int(arm.rewards),
                "reward_sum": float(arm.reward_sum),
                "posterior": {
                    "alpha": float(arm.alpha),
                    "beta": float(arm.beta),
                    "mean": float(arm.alpha) / float(arm.alpha + arm.beta),
                    "low": step_arm.get("low"),
                    "high": step_arm.get("high"),
                },
                "gates": arm.gate_results,
            }
        )
    winner = next((a.release_id for a in arms if a.state == "winner"), None)
    return {
        "config": config.to_json(),
        "steps": steps.step if steps is not None else 0,
        "last_step_at": steps.at.isoformat() if steps is not None else None,
        "last_seed": steps.seed if steps is not None else None,
        "leader": steps.leader if steps is not None else None,
        "leader_since": steps.leader_since.isoformat() if steps is not None and steps.leader_since else None,
        "winner_release_id": winner,
        "moved_by_steps": moved,
        "arms": out_arms,
    }
