"""Rollouts in the database: creation, targeting, views for the pure engine, and its units of work.

:func:`create` and :func:`command` are what the API calls; :func:`advance` and :func:`start_due` what
the engine tick runs. Each change runs in one unit of work (:func:`ota_server.rollout.unit_of_work.unit_of_work`):
lock, decide with the pure :mod:`ota_server.rollout.engine_logic`, apply with
:mod:`ota_server.rollout.apply`, commit, and only then send.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, ReasonCode, RolloutState
from ota_server.artifacts import ArtifactStore
from ota_server.context import Metrics, ServerContext
from ota_server.errors import InvalidRequest, NotFound
from ota_server.models import Bundle, Deployment, Device, Release, Rollout, utcnow
from ota_server.rollout import engine_logic as el
from ota_server.rollout.apply import apply_effects, snapshot
from ota_server.rollout.gate_results import GateResult
from ota_server.rollout.plan import DeviceInfo, Plan, Selector, Targeting, dry_run, select_targets
from ota_server.rollout.records import new_targeted_rollout
from ota_server.rollout.unit_of_work import Outbox, lock_rollout, unit_of_work
from ota_server.services import audit
from ota_server.services.bandit_engine import advance_bandit, arm_release_ids, is_bandit
from ota_server.services.evaluations import check_blessing
from ota_server.services.rollout_status import rollout_json
from ota_server.services.telemetry import record_gate_results, rollout_gate_results

GATE_METRIC_PREFIX = "gate_evaluation:"
"""Counter names ``gate_evaluation:<gate>:<state>`` (one per gate per engine tick), exported by ``/metrics``."""
MAX_STEPS = 10
"""Decisions per rollout per tick: effects describe state, so the engine loops until the rollout is stable."""


def compute_targeting(session: Session, rollout_id: str, release: Release, selector: Selector) -> Targeting:
    """The rollout's targets, in order, and who is left out.

    A device is skipped as "rolled back before" only when one of its install deployments of this
    release's bundles is ``rolled_back`` for a reason of its own (a failed health check, smoke test...);
    one the server ordered back (reason ``server_rollback``) is targeted again.
    """
    bundles = list(session.scalars(select(Bundle).where(Bundle.release_id == release.id)))
    profiles = {b.hardware_profile for b in bundles}
    shas = [b.sha256 for b in bundles]
    rolled_back = (
        set(
            session.scalars(
                select(Deployment.device_id).where(
                    Deployment.bundle_sha256.in_(shas),
                    Deployment.mode == "install",
                    Deployment.state == DeploymentState.ROLLED_BACK.value,
                    Deployment.reason != ReasonCode.SERVER_ROLLBACK.value,
                )
            )
        )
        if shas
        else set()
    )
    active = select(Device).where(Device.decommissioned_at.is_(None))
    devices = [DeviceInfo(d.id, d.hardware_profile, d.labels) for d in session.scalars(active)]
    return select_targets(rollout_id, selector, devices, profiles, rolled_back)


def create_rollout(
    session: Session,
    release_id: str,
    selector: Selector,
    plan: Plan,
    actor: str,
    dry: bool,
    allow_empty: bool = False,
) -> tuple[Rollout | None, dict[str, Any]]:
    """Create a draft rollout (or only compute the dry run).

    Raises NotFound for an unknown release, InvalidRequest when the selection targets no device (unless
    ``allow_empty``; a dry run only reports it): such a rollout would "complete" having updated nothing.
    """
    release = session.get(Release, release_id)
    if release is None:
        raise NotFound(f"release {release_id} not found")
    rollout_id = uuid.uuid4().hex
    targeting = compute_targeting(session, rollout_id, release, selector)
    preview = {
        "stages": dry_run(plan, targeting),
        "no_bundle_for_profile": list(targeting.no_bundle),
        "skipped_rolled_back_before": list(targeting.skipped),
        "eligible": len(targeting.targets),
    }
    if dry:
        return None, preview
    if not targeting.targets and not allow_empty:
        raise InvalidRequest(
            f"the selection targets no device ({len(targeting.no_bundle)} matched without a bundle for their profile, "
            f"{len(targeting.skipped)} rolled back this release before); use allow_empty (--allow-empty) to create it"
        )
    rollout = new_targeted_rollout(rollout_id, release.id, plan.to_json(), selector, targeting, actor)
    session.add(rollout)
    audit.record(
        session,
        actor,
        "rollout.create",
        "rollout",
        rollout.id,
        None,
        {**snapshot(rollout), "release_id": release.id, "targets": len(targeting.targets)},
    )
    return rollout, preview


def _reason(value: str) -> ReasonCode:
    try:
        return ReasonCode(value)
    except ValueError:  # a device may report a code this server does not know: never retried
        return ReasonCode.INTERNAL_ERROR


def _halted_by(value: str | None) -> el.Gate | None:
    try:
        return el.Gate(value) if value else None
    except ValueError:
        return None


def load_view(session: Session, rollout: Rollout, gate_results: tuple[GateResult, ...] = ()) -> el.RolloutView:
    """The pure engine's view of ``rollout``: the latest attempt per device, read as plain rows."""
    plan = Plan.from_json(rollout.plan)
    rows = session.execute(
        select(Deployment.device_id, Deployment.stage, Deployment.state, Deployment.updated_at)
        .add_columns(Deployment.attempt, Deployment.reason)
        .where(Deployment.rollout_id == rollout.id, Deployment.mode == plan.mode, Deployment.retried.is_(False))
    )
    # Only the targets' deployments: a device that left (decommissioned) no longer counts in any gate.
    targets = set(rollout.targets)
    views = {
        r.device_id: el.DeploymentView(
            r.device_id, r.stage, DeploymentState(r.state), r.updated_at, r.attempt, _reason(r.reason)
        )
        for r in rows
        if r.device_id in targets
    }
    return el.RolloutView(
        rollout_id=rollout.id,
        state=RolloutState(rollout.state),
        plan=plan,
        targets=tuple(rollout.targets),
        current_stage=rollout.current_stage,
        stage_started_at=rollout.stage_started_at,
        soak_started_at=rollout.soak_started_at,
        approved_stages=frozenset(int(s) for s in rollout.approved_stages),
        deployments=views,
        gate_results=gate_results,
        halted_by=_halted_by(rollout.halted_by),
    )


def advance(
    session: Session,
    store: ArtifactStore,
    rollout: Rollout,
    actor: str,
    outbox: Outbox,
    metrics: Metrics | None = None,
) -> int:
    """Run a locked, running rollout's engine decisions until it is stable; returns the effects applied.

    A bandit rollout (plan section ``bandit``) takes one decision of its own engine per tick
    (:func:`ota_server.services.bandit_engine.advance_bandit`)."""
    if is_bandit(rollout.plan):
        return advance_bandit(session, store, rollout, actor, outbox, metrics)
    applied = 0
    now = utcnow()
    gate_results = rollout_gate_results(session, store, rollout)
    record_gate_results(rollout, gate_results, now)
    if metrics is not None:
        for result in gate_results:
            metrics.inc(f"{GATE_METRIC_PREFIX}{result.name}:{result.state}")
    for _ in range(MAX_STEPS):
        if rollout.state != RolloutState.RUNNING.value:
            break
        effects = el.decide(load_view(session, rollout, gate_results), now)
        if not effects:
            break
        applied += len(effects)
        apply_effects(session, rollout, effects, actor, now, outbox)
        session.flush()
        if any(isinstance(e, el.Assign | el.Retry | el.StartSoak | el.TimeOut) for e in effects):
            break
    return applied


def start_due(session: Session, now: datetime, actor: str, outbox: Outbox) -> list[str]:
    """Start every scheduled rollout whose time has come (inside the caller's unit of work); their ids."""
    due = list(session.scalars(select(Rollout).where(Rollout.state == RolloutState.SCHEDULED.value)))
    started = []
    for rollout in due:
        if rollout.start_at is not None and rollout.start_at <= now:
            run_command(session, rollout, "start", actor, "scheduled start", outbox)
            started.append(rollout.id)
    return started


def run_command(
    session: Session, rollout: Rollout, command: el.Command, actor: str, reason: str, outbox: Outbox
) -> None:
    """Apply an operator command inside the caller's unit of work. Raises TransitionError when not allowed."""
    effects = el.apply_command(load_view(session, rollout), command, utcnow())
    apply_effects(session, rollout, effects, actor, utcnow(), outbox)
    if reason:
        audit.record(
            session, actor, f"rollout.command.{command}", "rollout", rollout.id, None, snapshot(rollout), reason
        )


def create(
    ctx: ServerContext,
    release_id: str,
    selector: Selector,
    plan: Plan,
    actor: str,
    *,
    dry: bool = False,
    start: bool = False,
    start_at: datetime | None = None,
    allow_empty: bool = False,
    override_blessing: str | None = None,
) -> dict[str, Any]:
    """Create a rollout in one unit of work; returns its status JSON plus ``preview``.

    ``dry``: only the preview, as ``{"dry_run": True, ...}``; nothing is stored. ``start``: the rollout
    starts at once and the engine's first decisions run in the same unit of work, so the first stage's
    assignments are published as soon as it commits. ``start_at`` (without ``start``): scheduled.
    Raises NotFound for an unknown release, InvalidRequest for a selection without targets (unless
    ``allow_empty``) or an ``override_blessing`` on a rollout that does not start, and Conflict when the
    release is not blessed and no ``override_blessing`` reason is given (:func:`evaluations.check_blessing`).
    """
    with unit_of_work(ctx) as unit:
        session = unit.session
        rollout, preview = create_rollout(session, release_id, selector, plan, actor, dry, allow_empty)
        if rollout is None:
            return {"dry_run": True, **preview}
        session.flush()
        if start or start_at is not None:  # the blessing gate: checked when the start is decided
            check_blessing(session, rollout.id, release_id, actor, override_blessing, ctx.settings.require_blessing)
        elif override_blessing:
            raise InvalidRequest("override_blessing applies only to a rollout that starts (start or start_at)")
        if start:
            run_command(session, rollout, "start", actor, "", unit.outbox)
            advance(session, ctx.store, rollout, actor, unit.outbox, ctx.metrics)
        elif start_at is not None:
            apply_effects(
                session, rollout, el.schedule(load_view(session, rollout), start_at), actor, utcnow(), unit.outbox
            )
        unit.mark_sends()
        session.flush()
        out = {**rollout_json(session, rollout), "preview": preview}
    return out


def command(
    ctx: ServerContext,
    rollout_id: str,
    cmd: el.Command,
    actor: str,
    reason: str,
    override_blessing: str | None = None,
) -> dict[str, Any]:
    """Run an operator command in one unit of work; returns the rollout's status JSON.

    ``start`` also runs the engine's first decisions in the same unit of work (see :func:`create`), after the
    blessing gate (``override_blessing``: the reason to start a release that is not blessed).

    Raises NotFound for an unknown rollout, TransitionError (a Conflict) when the state forbids it, Conflict
    when the release is not blessed and no override reason is given, InvalidRequest for an override on
    another command.
    """
    if override_blessing and cmd != "start":
        raise InvalidRequest("override_blessing applies only to the start command")
    with unit_of_work(ctx) as unit:
        rollout = lock_rollout(unit.session, rollout_id)
        if rollout is None:
            raise NotFound(f"rollout {rollout_id} not found")
        run_command(unit.session, rollout, cmd, actor, reason, unit.outbox)
        if cmd == "start":  # as `create --start`: the first stage goes out with this commit
            # The blessing gate first: a refusal rolls back the whole unit, the start included.
            for release_id in arm_release_ids(unit.session, rollout):  # a bandit: every arm may end up serving
                check_blessing(
                    unit.session, rollout.id, release_id, actor, override_blessing, ctx.settings.require_blessing
                )
            advance(unit.session, ctx.store, rollout, actor, unit.outbox, ctx.metrics)
        unit.mark_sends()
        unit.session.flush()
        out = rollout_json(unit.session, rollout)
    return out
