"""A bandit rollout's engine step: read its view from the database, decide (pure), apply, in the caller's unit.

:func:`advance_bandit` is what :func:`ota_server.services.rollouts.advance` runs for a rollout whose plan holds
a ``bandit`` section. It reads:

- each target's latest install attempt and the arm (release) of its bundle;
- per arm, the rewards of feedback rows (:class:`~ota_server.models.Feedback`) for the arm's model and version,
  from devices of this rollout, received since the rollout started: ``reward`` when given, else ``correct``
  as 1 or 0 (rows with neither are skipped), summed by the database;
- per live arm, the plan's telemetry gates judged on that arm's release alone (the gates of a staged rollout,
  :func:`ota_server.services.telemetry.gate_inputs`), kept on the arm's row for the status API;
- the last allocation step (``bandit_steps``).
"""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import case, func, or_, select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.artifacts import ArtifactStore
from ota_server.context import Metrics
from ota_server.models import BanditStep, Bundle, Deployment, Feedback, Release, Rollout, RolloutArm, utcnow
from ota_server.rollout import bandit_logic as bl
from ota_server.rollout import engine_logic as el
from ota_server.rollout.bandit import BanditConfig, Posterior, posterior
from ota_server.rollout.bandit_apply import apply_bandit_effects
from ota_server.rollout.gate_results import GateResult, configured, evaluate_gates
from ota_server.rollout.plan import Plan
from ota_server.rollout.unit_of_work import Outbox
from ota_server.services.telemetry import gate_inputs

BANDIT_KEY = "bandit"
"""The plan JSON's section that makes a rollout a bandit (its :class:`BanditConfig`)."""
GATE_METRIC = "gate_evaluation:{name}:{state}"
"""The counter each gate verdict increments (the staged engine's ``GATE_METRIC_PREFIX`` names)."""


def is_bandit(plan: dict[str, object] | None) -> bool:
    return bool(plan) and BANDIT_KEY in (plan or {})


def arm_release_ids(session: Session, rollout: Rollout) -> list[str]:
    """The releases a rollout installs: a bandit's arms in position order, else its one release."""
    if not is_bandit(rollout.plan):
        return [rollout.release_id]
    arms = select(RolloutArm.release_id).where(RolloutArm.rollout_id == rollout.id).order_by(RolloutArm.position)
    return list(session.scalars(arms)) or [rollout.release_id]


def _code(value: str) -> ReasonCode:
    try:
        return ReasonCode(value)
    except ValueError:
        return ReasonCode.INTERNAL_ERROR


def reward_totals(session: Session, rollout: Rollout, model_name: str, versions: list[str]) -> dict[str, Posterior]:
    """The Beta posterior per version from the rollout's devices' feedback since the rollout started."""
    since = rollout.stage_started_at or rollout.created_at
    value = func.coalesce(Feedback.reward, case((Feedback.correct.is_(True), 1.0), else_=0.0))
    devices = select(Deployment.device_id).where(Deployment.rollout_id == rollout.id).distinct()
    rows = session.execute(
        select(Feedback.version, func.count(), func.coalesce(func.sum(value), 0.0))
        .where(
            Feedback.model_name == model_name,
            Feedback.version.in_(versions),
            Feedback.received_at >= since,
            Feedback.device_id.in_(devices),
            or_(Feedback.reward.is_not(None), Feedback.correct.is_not(None)),
        )
        .group_by(Feedback.version)
    )
    found = {version: posterior(int(n), float(total)) for version, n, total in rows}
    return {v: found.get(v, posterior(0, 0.0)) for v in versions}


def _arm_gates(
    session: Session, store: ArtifactStore, rollout: Rollout, plan: Plan, release_id: str
) -> tuple[GateResult, ...]:
    """The plan's telemetry gates judged on one arm's release (an unsaved stand-in row names the release)."""
    if not configured(plan.gates):
        return ()
    arm_rollout = Rollout(id=rollout.id, release_id=release_id, plan=rollout.plan)
    return evaluate_gates(plan.gates, gate_inputs(session, store, arm_rollout, plan))


def load_bandit_view(session: Session, store: ArtifactStore, rollout: Rollout, now: datetime) -> bl.BanditView:
    """The pure engine's view of a bandit rollout; writes the arms' latest gate verdicts (when they change)."""
    plan = Plan.from_json(rollout.plan)
    config = BanditConfig.from_json(rollout.plan[BANDIT_KEY])
    arms = list(
        session.scalars(select(RolloutArm).where(RolloutArm.rollout_id == rollout.id).order_by(RolloutArm.position))
    )
    releases = {r.id: r for r in session.scalars(select(Release).where(Release.id.in_([a.release_id for a in arms])))}
    model = releases[arms[0].release_id].model_name if arms else ""
    rewards = reward_totals(session, rollout, model, [releases[a.release_id].version for a in arms])
    views: list[bl.ArmView] = []
    for arm in arms:
        release = releases[arm.release_id]
        gates: tuple[GateResult, ...] = ()
        if arm.state in bl.LIVE_ARMS:
            gates = _arm_gates(session, store, rollout, plan, arm.release_id)
            verdicts = [g.as_json() for g in gates]
            if gates and arm.gate_results != verdicts:
                arm.gate_results = verdicts
        state = cast(bl.ArmState, arm.state)
        views.append(bl.ArmView(arm.release_id, release.version, state, rewards[release.version], gates))
    shas = dict(session.execute(select(Bundle.sha256, Bundle.release_id).where(Bundle.release_id.in_(releases))).all())
    targets = set(rollout.targets)
    rows = session.execute(
        select(
            Deployment.device_id,
            Deployment.stage,
            Deployment.state,
            Deployment.updated_at,
            Deployment.attempt,
            Deployment.reason,
            Deployment.bundle_sha256,
        ).where(Deployment.rollout_id == rollout.id, Deployment.mode == "install", Deployment.retried.is_(False))
    )
    deployments: dict[str, el.DeploymentView] = {}
    arm_of: dict[str, str] = {}
    for r in rows:
        if r.device_id not in targets:
            continue  # a device that left the rollout (decommissioned) counts nowhere
        deployments[r.device_id] = el.DeploymentView(
            r.device_id, r.stage, DeploymentState(r.state), r.updated_at, r.attempt, _code(r.reason)
        )
        if r.bundle_sha256 in shas:
            arm_of[r.device_id] = shas[r.bundle_sha256]
    view = el.RolloutView(
        rollout_id=rollout.id,
        state=RolloutState(rollout.state),
        plan=plan,
        targets=tuple(rollout.targets),
        current_stage=rollout.current_stage,
        stage_started_at=rollout.stage_started_at,
        soak_started_at=rollout.soak_started_at,
        approved_stages=frozenset(),
        deployments=deployments,
    )
    return bl.BanditView(view, config, tuple(views), arm_of, last_step(session, rollout.id))


def last_step(session: Session, rollout_id: str) -> bl.LastStep | None:
    step = session.scalar(
        select(BanditStep).where(BanditStep.rollout_id == rollout_id).order_by(BanditStep.step.desc()).limit(1)
    )
    if step is None:
        return None
    probs = {str(a["release_id"]): float(a["prob_best"]) for a in step.arms}
    return bl.LastStep(step.step, step.at, probs, step.leader, step.leader_since)


def advance_bandit(
    session: Session,
    store: ArtifactStore,
    rollout: Rollout,
    actor: str,
    outbox: Outbox,
    metrics: Metrics | None = None,
) -> int:
    """One engine decision for a locked, running bandit rollout, applied in the caller's unit; effects applied."""
    now = utcnow()
    view = load_bandit_view(session, store, rollout, now)
    if metrics is not None:
        for arm in view.arms:
            for result in arm.gate_results:
                metrics.inc(GATE_METRIC.format(name=result.name, state=result.state))
    effects = bl.decide_bandit(view, now)
    if effects:
        apply_bandit_effects(session, rollout, effects, actor, now, outbox)
        session.flush()
    return len(effects)
