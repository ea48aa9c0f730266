"""A rollout's status as the API shows it: state, stage sizes, counts per deployment state.

Besides the plain columns, ``halted_by`` names the gate that halted the rollout (``failure_rate``,
``min_devices``, ``telemetry``; null when none did) and ``reverted`` says whether its updated devices
were ordered back to their previous bundle (``rollback``, a gate's rollback, ``abort --revert``).
``revert`` tells, per device, whether such an order worked: of the ``ordered`` devices (latest attempt of
an install the server ordered back), ``reverted`` run the previous bundle again (their rollback deployment
committed, or a check-in showed it), ``pending`` still have the rollback in progress, and ``not_reverted``
ended their rollback deployment without going back (failed or rolled back): a ``rolled_back`` rollout with
``not_reverted > 0`` did not bring every device back.

The status endpoint is on the hot path (``rollout status --watch``, dashboards), so it reads plain
columns and lets the database count: no ORM objects, and the target list (thousands of device ids)
is measured by ``json_array_length`` in SQL instead of being shipped and parsed.

``gates`` lists the plan's telemetry gates as the engine judged them last (``name``, ``state`` passed /
failed / not_evaluated, ``value``, ``threshold``, ``have``, ``need``, ``unit``, ``detail``; null before the
first judgement); ``telemetry`` gives the requests seen on the release's hardware profiles since the
rollout was created and the share whose release is known (``coverage``).

``blessing`` is what the blessing gate found when the rollout started (``state`` blessed / not_blessed /
not_evaluated, ``evaluation_id``, ``overridden`` with ``override_reason``; null for a rollout not started yet).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from edgeota_contract.states import DeploymentState
from ota_server.models import Bundle, Deployment, Release, Rollout
from ota_server.rollout.engine_logic import RETRYABLE_REASONS
from ota_server.rollout.plan import Plan
from ota_server.services.bandit_status import bandit_status
from ota_server.services.devices import deployment_json
from ota_server.services.evaluations import blessing_json
from ota_server.services.telemetry import attribution


class RolloutLike(Protocol):
    """A :class:`Rollout` or a row of :data:`STATUS_COLUMNS`."""

    id: str
    release_id: str
    state: str
    reason: str
    detail: str
    current_stage: int
    plan: dict[str, Any]
    selector: dict[str, Any]
    no_bundle: list[Any]
    skipped: list[Any]
    created_at: datetime
    updated_at: datetime
    created_by: str
    start_at: datetime | None
    halted_by: str | None
    reverted: bool
    gate_results: dict[str, Any] | None


STATUS_COLUMNS = (
    Rollout.id,
    Rollout.release_id,
    Rollout.state,
    Rollout.reason,
    Rollout.detail,
    Rollout.current_stage,
    Rollout.plan,
    Rollout.selector,
    Rollout.no_bundle,
    Rollout.skipped,
    Rollout.created_at,
    Rollout.updated_at,
    Rollout.created_by,
    Rollout.start_at,
    Rollout.halted_by,
    Rollout.reverted,
    Rollout.gate_results,
)


def rollout_json(session: Session, rollout: Rollout, with_devices: bool = True) -> dict[str, Any]:
    """The status of a loaded rollout; per-device deployments (every attempt) only when ``with_devices``."""
    return _status(session, rollout, len(rollout.targets), with_devices)


def rollout_status(session: Session, rollout_id: str, with_devices: bool = False) -> dict[str, Any] | None:
    """The status of ``rollout_id`` read as plain columns, or None when there is no such rollout."""
    row = session.execute(
        select(*STATUS_COLUMNS, func.json_array_length(Rollout.targets).label("target_count")).where(
            Rollout.id == rollout_id
        )
    ).first()
    if row is None:
        return None
    return _status(session, row, int(row.target_count or 0), with_devices)


_TERMINAL = [s.value for s in DeploymentState if s.terminal]


def _revert_counts(session: Session, rollout_id: str, mode: str) -> dict[str, int]:
    """Per device, what a server-ordered revert of this rollout achieved (see the module docstring)."""
    rb = aliased(Deployment)
    rows = session.execute(
        select(Deployment.state, rb.state, func.count())
        .join(rb, rb.id == Deployment.reverted_by)
        .where(
            Deployment.rollout_id == rollout_id,
            Deployment.mode == mode,
            Deployment.retried.is_(False),
            # Implied by the join, but said so the planner looks up only reverted installs instead of hashing
            # every deployment of every rollout (PostgreSQL did: 16 ms at 19,000 rows, growing with the table).
            Deployment.reverted_by.is_not(None),
        )
        .group_by(Deployment.state, rb.state)
    ).all()
    out = {"ordered": 0, "reverted": 0, "pending": 0, "not_reverted": 0}
    for install_state, rollback_state, n in rows:
        out["ordered"] += n
        if install_state == DeploymentState.ROLLED_BACK.value or rollback_state == DeploymentState.COMMITTED.value:
            out["reverted"] += n
        elif rollback_state in _TERMINAL:
            out["not_reverted"] += n
        else:
            out["pending"] += n
    return out


FAILURES_SHOWN = 10
"""Failed or rolled-back devices listed by name in ``failures.devices`` (the newest); the rest are counted."""


def _failures(session: Session, rollout_id: str, mode: str) -> dict[str, Any]:
    """Why devices failed: ``total`` (latest attempts failed or rolled back), ``by_reason`` (reason code ->
    devices) and ``devices`` (the newest :data:`FAILURES_SHOWN`: device, state, reason, detail)."""
    ended = [DeploymentState.FAILED.value, DeploymentState.ROLLED_BACK.value]
    where = (
        Deployment.rollout_id == rollout_id,
        Deployment.mode == mode,
        Deployment.retried.is_(False),
        Deployment.state.in_(ended),
    )
    by_reason = {
        reason: int(n)
        for reason, n in session.execute(
            select(Deployment.reason, func.count())
            .where(*where)
            .group_by(Deployment.reason)
            .order_by(Deployment.reason)
        )
    }
    total = sum(by_reason.values())
    devices = []
    if total:
        rows = session.execute(
            select(Deployment.device_id, Deployment.state, Deployment.reason, Deployment.detail)
            .where(*where)
            .order_by(Deployment.updated_at.desc(), Deployment.device_id)
            .limit(FAILURES_SHOWN)
        )
        devices = [{"device_id": r[0], "state": r[1], "reason": r[2], "detail": r[3]} for r in rows]
    return {"total": total, "by_reason": by_reason, "devices": devices}


def _gates_json(session: Session, rollout: RolloutLike) -> dict[str, Any]:
    """``gates`` (the telemetry gates as the engine last judged them; null before the first judgement),
    ``gates_evaluated_at`` and ``telemetry`` (requests on the release's profiles since the rollout was created,
    with version attribution coverage)."""
    recorded = rollout.gate_results or {}
    profiles = set(session.scalars(select(Bundle.hardware_profile).where(Bundle.release_id == rollout.release_id)))
    return {
        "gates": recorded.get("gates"),
        "gates_evaluated_at": recorded.get("at"),
        "telemetry": attribution(session, profiles, rollout.created_at),
    }


def _status(session: Session, rollout: RolloutLike, target_count: int, with_devices: bool) -> dict[str, Any]:
    plan = Plan.from_json(rollout.plan)
    grouped = session.execute(
        select(Deployment.mode, Deployment.state, Deployment.retried, func.count())
        .where(Deployment.rollout_id == rollout.id)
        .group_by(Deployment.mode, Deployment.state, Deployment.retried)
    ).all()
    # Counts are per device (its latest attempt); retried attempts are counted apart.
    counts: dict[str, int] = {}
    rollback_counts: dict[str, int] = {}
    retried_attempts = 0
    for mode, state, retried, n in grouped:
        if retried:
            retried_attempts += n
        elif mode == plan.mode:
            counts[state] = counts.get(state, 0) + n
        elif mode == "rollback":
            rollback_counts[state] = rollback_counts.get(state, 0) + n
    waiting = 0
    if plan.max_retries and counts.get(DeploymentState.FAILED.value):
        waiting = (
            session.scalar(
                select(func.count()).where(
                    Deployment.rollout_id == rollout.id,
                    Deployment.mode == plan.mode,
                    Deployment.retried.is_(False),
                    Deployment.state == DeploymentState.FAILED.value,
                    Deployment.reason.in_([r.value for r in RETRYABLE_REASONS]),
                    Deployment.attempt <= plan.max_retries,
                )
            )
            or 0
        )
    release = session.get(Release, rollout.release_id)  # by primary key: one row, cached per session
    out: dict[str, Any] = {
        "rollout_id": rollout.id,
        "release_id": rollout.release_id,
        "model_name": release.model_name if release is not None else None,
        "version": release.version if release is not None else None,
        "state": rollout.state,
        "reason": rollout.reason,
        "detail": rollout.detail,
        "current_stage": rollout.current_stage,
        "stage_count": len(plan.stages),
        "stage_sizes": plan.stage_sizes(target_count),
        "plan": rollout.plan,
        "selector": rollout.selector,
        "targets": target_count,
        "no_bundle_for_profile": rollout.no_bundle,
        "skipped_rolled_back_before": rollout.skipped,
        "counts": {s.value: counts.get(s.value, 0) for s in DeploymentState},
        "rollback_counts": rollback_counts,
        "retries": {"retried_attempts": retried_attempts, "waiting": waiting},
        "created_at": rollout.created_at.isoformat(),
        "updated_at": rollout.updated_at.isoformat(),
        "created_by": rollout.created_by,
        "start_at": rollout.start_at.isoformat() if rollout.start_at else None,
        "halted_by": rollout.halted_by,
        "reverted": bool(rollout.reverted),
        **_gates_json(session, rollout),
        "revert": _revert_counts(session, rollout.id, plan.mode),
        "failures": _failures(session, rollout.id, plan.mode),
        "blessing": blessing_json(session, rollout.id),
    }
    if "bandit" in rollout.plan:  # a bandit rollout: its arms and allocation (services.bandit_status)
        out["bandit"] = bandit_status(session, rollout.id, rollout.plan)
    if with_devices:
        deps = session.scalars(
            select(Deployment).where(Deployment.rollout_id == rollout.id).order_by(Deployment.created_at, Deployment.id)
        )
        out["deployments"] = [deployment_json(d) for d in deps]
    return out
