"""What the rollout pages show, read with a few grouped SQL queries (never a loop over deployments).

Progress counts only what devices reported: ``committed``; ``failed`` (failed or rolled back); ``active``
(downloading .. trial: a device said it is working on it); ``waiting`` (pending or notified: assigned, no report
yet); and ``unassigned`` (in the stage but not assigned yet). Counts are per device: the latest attempt
(``retried`` false) of the rollout's mode.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from edgeota_contract.states import DeploymentState, RolloutState
from ota_server.api.routes.rollouts import COMMAND_ROLE
from ota_server.models import AuditEntry, Bundle, Deployment, Device, Rollout
from ota_server.rollout.engine_logic import COMMAND_FROM
from ota_server.rollout.plan import Plan
from ota_server.web.auth import UiUser

DS = DeploymentState
FAILED = frozenset({DS.FAILED.value, DS.ROLLED_BACK.value})
WAITING = frozenset({DS.PENDING.value, DS.NOTIFIED.value})
ACTIVE = frozenset({DS.DOWNLOADING.value, DS.DOWNLOADED.value, DS.VERIFYING.value, DS.INSTALLING.value, DS.TRIAL.value})
ACTIONS = ("start", "resume", "approve", "pause", "retry_failed", "abort", "abort_revert", "rollback")
"""The operator commands the dashboard offers, in the order of the buttons."""
ACTION_LABEL = {
    "start": "Start",
    "resume": "Continue (resume)",
    "approve": "Approve this stage",
    "pause": "Pause",
    "retry_failed": "Retry failed devices",
    "abort": "Abort",
    "abort_revert": "Abort and revert updated devices",
    "rollback": "Roll back",
}
ACTION_EXPLAIN = {
    "start": "The rollout starts: its first stage's devices are assigned at once (a release that is not blessed may "
    "be refused, as by the API).",
    "resume": "The rollout runs again from its current stage; the gates are judged afresh.",
    "approve": "The current stage, which waits for approval, may assign its devices.",
    "pause": "No new devices are assigned until someone resumes; devices already updating go on.",
    "retry_failed": "Every device whose latest attempt failed gets a new attempt of the same bundle. The rollout's "
    "state does not change: a paused rollout stays paused until you resume it.",
    "abort": "The rollout ends; devices not yet notified are cancelled. Updated devices keep the new release.",
    "abort_revert": "The rollout ends and every updated device is sent back to the release it ran before.",
    "rollback": "Every updated device is sent back to the release it ran before; the rollout ends rolled back.",
}


@dataclass
class StageView:
    index: int
    size: int
    """Devices in this stage alone (not cumulative)."""
    percent: float | None
    count: int | None
    soak_seconds: float
    requires_approval: bool
    counts: dict[str, int] = field(default_factory=dict)

    def bucket(self, states: frozenset[str]) -> int:
        return sum(n for s, n in self.counts.items() if s in states)

    @property
    def committed(self) -> int:
        return self.counts.get(DS.COMMITTED.value, 0)

    @property
    def failed(self) -> int:
        return self.bucket(FAILED)

    @property
    def active(self) -> int:
        return self.bucket(ACTIVE)

    @property
    def waiting(self) -> int:
        return self.bucket(WAITING)

    @property
    def unassigned(self) -> int:
        return max(0, self.size - sum(self.counts.values()))

    def share(self, n: int) -> float:
        """``n`` as a percentage of the stage (0 for an empty stage), for the progress bar."""
        return 0.0 if self.size <= 0 else min(100.0, 100.0 * n / self.size)

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.index,
            "size": self.size,
            "committed": self.committed,
            "failed": self.failed,
            "active": self.active,
            "waiting": self.waiting,
            "unassigned": self.unassigned,
            "counts": self.counts,
        }


Group = tuple[int, str, str, int]
"""(stage, deployment state, bundle sha256, devices) of a rollout's latest attempts of its mode."""


def groups(session: Session, rollout_id: str, mode: str) -> list[Group]:
    """One grouped count of the rollout's latest attempts of ``mode`` (read from the covering index
    ``ix_deployments_rollout_summary`` alone): what the stages' progress and the per-profile table are summed from.
    """
    rows = session.execute(
        select(Deployment.stage, Deployment.state, Deployment.bundle_sha256, func.count())
        .where(Deployment.rollout_id == rollout_id, Deployment.mode == mode, Deployment.retried.is_(False))
        .group_by(Deployment.stage, Deployment.state, Deployment.bundle_sha256)
    ).all()
    return [(int(stage), str(state), str(sha), int(n)) for stage, state, sha, n in rows]


def stages(session: Session, status: dict[str, Any], counted: list[Group] | None = None) -> list[StageView]:
    """Per stage, the latest attempt's state counts of the rollout's mode (``counted``: :func:`groups`, read when
    not given)."""
    plan = Plan.from_json(status["plan"])
    if counted is None:
        counted = groups(session, status["rollout_id"], plan.mode)
    cumulative = status["stage_sizes"]
    out = []
    for i, stage in enumerate(plan.stages):
        before = cumulative[i - 1] if i else 0
        out.append(
            StageView(
                i,
                cumulative[i] - before,
                stage.percent,
                stage.count,
                stage.soak_seconds,
                stage.requires_approval,
            )
        )
    for stage_index, state, _, n in counted:
        if 0 <= stage_index < len(out):
            out[stage_index].counts[state] = out[stage_index].counts.get(state, 0) + n
    return out


_TARGETS_CACHE: OrderedDict[tuple[str, str, str, int], dict[str, int]] = OrderedDict()
_TARGETS_CACHE_SIZE = 64
_TARGETS_LOCK = threading.Lock()


def _targets_per_profile(session: Session, rollout_id: str, updated_at: str, target_count: int) -> dict[str, int]:
    """Targets per hardware profile, counted in SQL over the JSON target list (10,000 ids: the costliest read of
    the page), remembered per (database, rollout, ``updated_at``, target count).

    Why the memo is exact: a device's hardware profile never changes, and a rollout's targets change only when a
    decommissioned device leaves them (:mod:`ota_server.rollout.decommission`), which shortens the list and bumps
    ``updated_at``; either one changes the key.
    """
    key = (str(session.get_bind().engine.url), rollout_id, updated_at, target_count)
    with _TARGETS_LOCK:
        hit = _TARGETS_CACHE.get(key)
        if hit is not None:
            _TARGETS_CACHE.move_to_end(key)
            return dict(hit)
    if session.get_bind().dialect.name == "postgresql":
        sql = (
            "SELECT d.hardware_profile, count(*) FROM rollouts r "
            "CROSS JOIN LATERAL json_array_elements_text(r.targets) AS t(device_id) "
            "JOIN devices d ON d.id = t.device_id WHERE r.id = :rid GROUP BY d.hardware_profile"
        )
    else:
        sql = (
            "SELECT d.hardware_profile, count(*) FROM rollouts r, json_each(r.targets) t "
            "JOIN devices d ON d.id = t.value WHERE r.id = :rid GROUP BY d.hardware_profile"
        )
    counted = {str(p): int(n) for p, n in session.execute(text(sql), {"rid": rollout_id})}
    with _TARGETS_LOCK:
        _TARGETS_CACHE[key] = counted
        while len(_TARGETS_CACHE) > _TARGETS_CACHE_SIZE:
            _TARGETS_CACHE.popitem(last=False)
    return dict(counted)


def profiles(
    session: Session, status: dict[str, Any], mode: str, counted: list[Group] | None = None
) -> list[dict[str, Any]]:
    """Targets per hardware profile with their deployment states (latest attempt of ``mode``).

    The states are grouped by the deployment's bundle, whose hardware profile is the device's (a deployment gets
    the release's bundle for the device's profile, and a profile never changes): a scan of the covering index
    ``ix_deployments_rollout_summary`` instead of a join with ``devices`` per deployment.
    """
    rollout_id = status["rollout_id"]
    targets = _targets_per_profile(session, rollout_id, status["updated_at"], int(status["targets"]))
    if counted is None:
        counted = groups(session, rollout_id, mode)
    shas = sorted({sha for _, _, sha, _ in counted})
    profile_of: dict[str, str] = {}
    if shas:
        bundles = session.execute(select(Bundle.sha256, Bundle.hardware_profile).where(Bundle.sha256.in_(shas)))
        profile_of = {str(sha): str(profile) for sha, profile in bundles}
    states: dict[str, dict[str, int]] = {}
    for _, state, sha, n in counted:
        counts = states.setdefault(profile_of.get(sha, "?"), {})
        counts[state] = counts.get(state, 0) + n
    out = []
    for profile in sorted(set(targets) | set(states)):
        counts = states.get(profile, {})
        out.append(
            {
                "profile": profile,
                "targets": targets.get(profile, 0),
                "committed": counts.get(DS.COMMITTED.value, 0),
                "failed": sum(n for s, n in counts.items() if s in FAILED),
                "in_progress": sum(n for s, n in counts.items() if s in ACTIVE or s in WAITING),
            }
        )
    return out


def incompatible(session: Session, device_ids: list[str], limit: int = 200) -> list[dict[str, Any]]:
    """The devices the rollout left out for lack of a bundle for their profile, with that profile."""
    ids = [str(d) for d in device_ids[:limit]]
    found = {
        r.id: r.hardware_profile
        for r in session.execute(select(Device.id, Device.hardware_profile).where(Device.id.in_(ids)))
    }
    return [{"device_id": d, "hardware_profile": found.get(d, "?")} for d in ids]


def failed_devices(session: Session, rollout_id: str, mode: str, limit: int = 100) -> list[dict[str, Any]]:
    rows = session.execute(
        select(Deployment.device_id, Deployment.state, Deployment.reason, Deployment.detail, Deployment.attempt)
        .where(
            Deployment.rollout_id == rollout_id,
            Deployment.mode == mode,
            Deployment.retried.is_(False),
            Deployment.state.in_(sorted(FAILED)),
        )
        .order_by(Deployment.device_id)
        .limit(limit)
    ).all()
    return [
        {"device_id": r.device_id, "state": r.state, "reason": r.reason, "detail": r.detail, "attempt": r.attempt}
        for r in rows
    ]


def timeline(session: Session, rollout_id: str, limit: int = 200) -> list[AuditEntry]:
    """The rollout's own audit entries (state changes, stages, commands), oldest first."""
    return list(
        session.scalars(
            select(AuditEntry)
            .where(AuditEntry.entity_type == "rollout", AuditEntry.entity_id == rollout_id)
            .order_by(AuditEntry.id)
            .limit(limit)
        )
    )


def allowed_actions(user: UiUser, state: str, status: dict[str, Any]) -> list[str]:
    """The commands the user's role and the rollout's state allow now (what the page offers as buttons)."""
    rollout_state = RolloutState(state)
    out = []
    for action in ACTIONS:
        if rollout_state not in COMMAND_FROM[action] or not user.may(COMMAND_ROLE[action]):
            continue
        if action == "approve":
            plan = Plan.from_json(status["plan"])
            stage = plan.stages[min(status["current_stage"], len(plan.stages) - 1)]
            if not stage.requires_approval:
                continue
        if action == "retry_failed" and not status["counts"].get(DS.FAILED.value):
            continue
        out.append(action)
    return out


def failure_rate_gate(status: dict[str, Any]) -> dict[str, Any]:
    """The device failure-rate gate in the shape of a telemetry gate: failed (and rolled back) over finished
    devices against ``max_failure_rate``, "not evaluated" below ``min_count_for_failure_rate`` finished devices.
    (Failures that will be retried automatically count here; the engine leaves them out until they are final.)"""
    gates = status["plan"].get("gates", {})
    counts = status["counts"]
    failed = counts.get(DS.FAILED.value, 0) + counts.get(DS.ROLLED_BACK.value, 0)
    finished = failed + counts.get(DS.COMMITTED.value, 0)
    need = int(gates.get("min_count_for_failure_rate", 1))
    threshold = float(gates.get("max_failure_rate", 0.0))
    value = failed / finished if finished else None
    if status.get("halted_by") == "failure_rate":
        state = "failed"
    elif finished < max(1, need):
        state = "not_evaluated"
    else:
        state = "failed" if value is not None and value > threshold else "passed"
    return {
        "name": "failure_rate",
        "state": state,
        "value": value,
        "threshold": threshold,
        "have": finished,
        "need": need,
        "unit": "finished devices",
        "detail": f"{failed} of {finished} finished devices failed",
    }


def live(session: Session, rollout_id: str) -> dict[str, Any] | None:
    """The JSON the page's script polls every 2 s: state, banner facts, per-stage progress, gates. None: no such
    rollout.

    Polled by every open rollout page, so it reads two things only: the rollout's plain columns and one grouped
    count (:func:`groups`); ``counts`` and ``gates`` are what the rollout status (``services.rollout_status``) gives
    (counts per state of the latest attempts of the plan's mode; the telemetry gates as the engine last judged them).
    """
    row = session.execute(
        select(
            Rollout.state,
            Rollout.reason,
            Rollout.detail,
            Rollout.current_stage,
            Rollout.plan,
            Rollout.updated_at,
            Rollout.halted_by,
            Rollout.gate_results,
            func.json_array_length(Rollout.targets).label("target_count"),
        ).where(Rollout.id == rollout_id)
    ).first()
    if row is None:
        return None
    plan = Plan.from_json(row.plan)
    counted = groups(session, rollout_id, plan.mode)
    per_state: dict[str, int] = {}
    for _, state, _, n in counted:
        per_state[state] = per_state.get(state, 0) + n
    status = {
        "rollout_id": rollout_id,
        "plan": row.plan,
        "stage_sizes": plan.stage_sizes(int(row.target_count or 0)),
        "counts": {s.value: per_state.get(s.value, 0) for s in DeploymentState},
        "halted_by": row.halted_by,
    }
    recorded = row.gate_results or {}
    return {
        "rollout_id": rollout_id,
        "state": row.state,
        "halted_by": row.halted_by,
        "reason": row.reason,
        "detail": row.detail,
        "current_stage": row.current_stage,
        "updated_at": row.updated_at.isoformat(),
        "counts": status["counts"],
        "stages": [s.as_json() for s in stages(session, status, counted)],
        "gates": [*(recorded.get("gates") or []), failure_rate_gate(status)],
        "gates_evaluated_at": recorded.get("at"),
    }


def exists(session: Session, rollout_id: str) -> bool:
    return session.get(Rollout, rollout_id) is not None
