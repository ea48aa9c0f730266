"""Persisting effects onto rows, inside a unit of work (:mod:`ota_server.rollout.unit_of_work`).

:func:`apply_effects` applies the rollout effects of the engine tick and of operator commands
(:mod:`ota_server.rollout.engine_logic`); :func:`apply_deployment_effects` those of device reports and
check-ins (:mod:`ota_server.rollout.deployment_rules`). Both write audit rows in the same
transaction and put what must be sent into the unit's :class:`Outbox`; neither commits nor sends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from edgeota_contract.states import RolloutState
from ota_server.models import Deployment, Rollout
from ota_server.rollout import deployment_rules as rules
from ota_server.rollout import deployments as deps
from ota_server.rollout import engine_logic as el
from ota_server.rollout.gate_results import GateResult
from ota_server.rollout.records import move, set_rollout_state
from ota_server.rollout.unit_of_work import Outbox
from ota_server.services import audit


def snapshot(r: Rollout) -> dict[str, Any]:
    """The audited picture of a rollout (before/after a change)."""
    return {"state": r.state, "current_stage": r.current_stage, "reason": r.reason, "detail": r.detail}


def _gates(results: Sequence[GateResult]) -> dict[str, Any]:
    """The telemetry gates' verdicts for an audit row (none set: nothing added)."""
    return {"gates": [g.as_json() for g in results]} if results else {}


def apply_effects(
    session: Session, rollout: Rollout, effects: Sequence[el.Effect], actor: str, now: datetime, outbox: Outbox
) -> None:
    """Persist rollout effects (the caller's unit of work commits); new deployments go into ``outbox``."""
    for effect in effects:
        if isinstance(effect, el.Assign):
            outbox.deployments.extend(deps.assign(session, rollout, effect.device_ids, effect.stage, actor, now))
        elif isinstance(effect, el.Retry):
            outbox.deployments.extend(deps.retry(session, rollout, effect.device_ids, actor, now))
        elif isinstance(effect, el.TimeOut):
            deps.finish_install(
                session, rollout, effect.device_ids, "time_out", "no report before timeout", now, actor, outbox
            )
        elif isinstance(effect, el.CancelDeployments):
            deps.finish_install(
                session, rollout, effect.device_ids, "cancel", "cancelled by rollout", now, actor, outbox
            )
        elif isinstance(effect, el.RevertDevices):
            outbox.deployments.extend(deps.revert_devices(session, rollout, effect.device_ids, actor, now, outbox))
        elif isinstance(effect, el.EnterStage):
            before = snapshot(rollout)
            rollout.current_stage = effect.stage
            rollout.stage_started_at = now
            rollout.soak_started_at = None
            audit.record(
                session,
                actor,
                "rollout.stage",
                "rollout",
                rollout.id,
                before,
                {**snapshot(rollout), **_gates(effect.gates)},
                f"entered stage {effect.stage}",
            )
        elif isinstance(effect, el.StartSoak):
            rollout.soak_started_at = effect.at
        elif isinstance(effect, el.ApproveStage):
            rollout.approved_stages = sorted({*rollout.approved_stages, effect.stage})
            audit.record(
                session, actor, "rollout.approve", "rollout", rollout.id, None, {"approved_stage": effect.stage}
            )
        elif isinstance(effect, el.Schedule):
            rollout.start_at = effect.at
        elif isinstance(effect, el.SetState):
            before = snapshot(rollout)
            set_rollout_state(rollout, effect, now)
            after: dict[str, Any] = snapshot(rollout)
            if effect.halted_by is not None:
                after["halted_by"] = effect.halted_by.value
            after.update(_gates(effect.gates))
            if rollout.start_at is not None and effect.state == RolloutState.SCHEDULED:
                after["start_at"] = rollout.start_at.isoformat()
            audit.record(
                session, actor, f"rollout.{effect.state.value}", "rollout", rollout.id, before, after, effect.detail
            )
    rollout.updated_at = now


def apply_deployment_effects(
    session: Session,
    effects: Sequence[rules.DeploymentEffect],
    now: datetime,
    outbox: Outbox,
    record_running: Callable[[str, str], None],
    prepare_resend: Callable[[list[Deployment]], list[str]],
    actor: str = "ingest",
) -> None:
    """Persist the effects of a device report or check-in.

    ``record_running(device_id, sha256)`` updates what the device runs (ingest owns that record, and
    its batch caches); ``prepare_resend`` gives deployments fresh assignment ids and returns the ids to
    send. A :class:`~ota_server.rollout.deployment_rules.RevertLate` creates the rollback deployment
    (audited, once per rollout and device) and sends it.
    """
    for effect in effects:
        if isinstance(effect, rules.Transition):
            dep = session.get(Deployment, effect.deployment_id)
            if dep is not None:
                move(dep, effect, now)
        elif isinstance(effect, rules.RecordRunning):
            record_running(effect.device_id, effect.bundle_sha256)
        elif isinstance(effect, rules.RevertLate):
            dep = session.get(Deployment, effect.deployment_id)
            rollout = session.get(Rollout, dep.rollout_id) if dep is not None and dep.rollout_id else None
            if dep is None or rollout is None:
                continue
            new_ids = deps.revert_devices(session, rollout, (dep.device_id,), actor, now, outbox, note_skipped=False)
            pending = [d for d in (session.get(Deployment, i) for i in new_ids) if d is not None]
            outbox.deployments.extend(prepare_resend(pending))
        elif isinstance(effect, rules.Resend):
            open_deps = [d for d in (session.get(Deployment, i) for i in effect.deployment_ids) if d is not None]
            outbox.deployments.extend(prepare_resend(open_deps))
