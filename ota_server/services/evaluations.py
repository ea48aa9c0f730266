"""Evaluations of candidate releases, and the blessing gate on starting a rollout.

An evaluation record (:class:`edgeota.evaluation.record.EvaluationRecord`) is computed where the models run
(``edgeota evaluate``) and uploaded here. :func:`store_evaluation` trusts none of its conclusions: both
releases must exist and be of the record's model, every bundle sha256 must be that release's bundle for that
profile, the slices must add up, and the verdict is recomputed from the metrics and thresholds with the same
pure :func:`edgeota.evaluation.blessing.decide`; a record whose own verdict differs is refused.

:func:`check_blessing` runs when a rollout starts (``create`` with ``start`` or ``start_at``, or the ``start``
command): the release's latest evaluation (newest upload with it as candidate) decides. ``not_blessed``, or
``not_evaluated`` while the ``require_blessing`` setting is on, refuses the start unless the caller gives an
override reason; an override is written to the audit log (``rollout.blessing_override``, actor and reason) and
every check is kept per rollout (:class:`RolloutBlessing`) for the rollout's status.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import JSON, Boolean, ForeignKey, Index, String, Text, select
from sqlalchemy.orm import Mapped, Session, mapped_column

from edgeota.evaluation.blessing import EvaluationError, decide
from edgeota.evaluation.record import EvaluationRecord, ReleaseRef
from ota_server.errors import Conflict, InvalidRequest, NotFound
from ota_server.models import Base, Bundle, Release, utcnow
from ota_server.services import audit

BlessingState = Literal["blessed", "not_blessed", "not_evaluated"]


class Evaluation(Base):
    """One uploaded evaluation of ``candidate_release_id`` against ``baseline_release_id``; ``record`` is the
    record as stored, with the server's verdict. Rows are never updated."""

    __tablename__ = "evaluations"
    __table_args__ = (Index("ix_evaluations_candidate_created", "candidate_release_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    candidate_release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"))
    baseline_release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"), index=True)
    model_name: Mapped[str] = mapped_column(String(64))
    blessed: Mapped[bool] = mapped_column(Boolean)
    dataset_digest: Mapped[str] = mapped_column(String(64))
    record: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))


class RolloutBlessing(Base):
    """What the blessing gate found for one release when a rollout started, and the override that let it start,
    if any (one row per release the rollout may serve: a bandit rollout has one per arm)."""

    __tablename__ = "rollout_blessings"

    rollout_id: Mapped[str] = mapped_column(ForeignKey("rollouts.id"), primary_key=True)
    release_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    evaluation_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    overridden: Mapped[bool] = mapped_column(Boolean, default=False)
    override_reason: Mapped[str] = mapped_column(Text, default="")
    checked_by: Mapped[str] = mapped_column(String(128))
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)


def _check_release(session: Session, role: str, ref: ReleaseRef, model_name: str) -> Release:
    release = session.get(Release, ref.release_id)
    if release is None:
        raise NotFound(f"{role} release {ref.release_id} not found")
    if release.model_name != model_name or release.version != ref.version:
        raise InvalidRequest(
            f"{role} release {ref.release_id} is {release.model_name} {release.version}, "
            f"the record says {model_name} {ref.version}"
        )
    rows = session.execute(select(Bundle.hardware_profile, Bundle.sha256).where(Bundle.release_id == release.id))
    shas = {profile: sha for profile, sha in rows}
    for profile, sha in ref.bundles.items():
        if shas.get(profile) != sha:
            raise InvalidRequest(f"{role} bundle {sha[:12]} is not release {release.id}'s bundle for {profile}")
    return release


def store_evaluation(session: Session, record: EvaluationRecord, actor: str) -> Evaluation:
    """Check ``record`` (see the module doc), store it with the server's verdict, and audit it.

    Raises:
        NotFound: the candidate or baseline release does not exist.
        InvalidRequest: a release of another model or version, a bundle that is not the release's, the same
            release on both sides, slices that do not add up, or a verdict that does not follow from them.
    """
    if record.candidate.release_id == record.baseline.release_id:
        raise InvalidRequest("candidate and baseline are the same release")
    if record.dataset.model_name != record.model_name:
        raise InvalidRequest(f"the dataset is of model {record.dataset.model_name}, not {record.model_name}")
    _check_release(session, "candidate", record.candidate, record.model_name)
    _check_release(session, "baseline", record.baseline, record.model_name)
    profiles = {m.profile for m in record.metrics if m.profile is not None}
    if not profiles <= set(record.candidate.bundles) or not profiles <= set(record.baseline.bundles):
        raise InvalidRequest("metrics name a profile whose bundles the record does not list")
    try:
        verdict = decide(list(record.metrics), record.thresholds)
    except EvaluationError as exc:
        raise InvalidRequest(f"inconsistent metrics: {exc}") from exc
    if record.verdict is not None and record.verdict != verdict:
        raise InvalidRequest(
            f"the record's verdict (blessed={record.verdict.blessed}) does not follow from its metrics and "
            f"thresholds (blessed={verdict.blessed})"
        )
    stored = record.model_copy(update={"verdict": verdict})
    evaluation = Evaluation(
        id=uuid.uuid4().hex,
        candidate_release_id=record.candidate.release_id,
        baseline_release_id=record.baseline.release_id,
        model_name=record.model_name,
        blessed=verdict.blessed,
        dataset_digest=record.dataset.digest,
        record=stored.model_dump(mode="json"),
        created_by=actor,
    )
    session.add(evaluation)
    session.flush()
    audit.record(
        session,
        actor,
        "evaluation.create",
        "release",
        record.candidate.release_id,
        None,
        {
            "evaluation_id": evaluation.id,
            "baseline_release_id": record.baseline.release_id,
            "blessed": verdict.blessed,
            "dataset_digest": record.dataset.digest,
            "reasons": verdict.reasons[:20],
        },
    )
    return evaluation


def evaluation_json(evaluation: Evaluation) -> dict[str, Any]:
    return {
        "evaluation_id": evaluation.id,
        "candidate_release_id": evaluation.candidate_release_id,
        "baseline_release_id": evaluation.baseline_release_id,
        "model_name": evaluation.model_name,
        "blessed": evaluation.blessed,
        "dataset_digest": evaluation.dataset_digest,
        "created_at": evaluation.created_at.isoformat(),
        "created_by": evaluation.created_by,
        "record": evaluation.record,
    }


def get_evaluation(session: Session, evaluation_id: str) -> Evaluation:
    """Raises NotFound."""
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise NotFound(f"evaluation {evaluation_id} not found")
    return evaluation


def list_evaluations(session: Session, release_id: str | None, limit: int, offset: int) -> list[Evaluation]:
    """Newest first; ``release_id`` keeps the evaluations with that release as candidate."""
    stmt = select(Evaluation).order_by(Evaluation.created_at.desc(), Evaluation.id)
    if release_id:
        stmt = stmt.where(Evaluation.candidate_release_id == release_id)
    return list(session.scalars(stmt.offset(offset).limit(limit)))


def latest_evaluation(session: Session, release_id: str) -> Evaluation | None:
    """The newest evaluation with ``release_id`` as candidate (what the blessing gate reads)."""
    return session.scalar(
        select(Evaluation)
        .where(Evaluation.candidate_release_id == release_id)
        .order_by(Evaluation.created_at.desc(), Evaluation.id.desc())
        .limit(1)
    )


@dataclass(frozen=True)
class BlessingDecision:
    """The gate's answer for one release (pure; :func:`blessing_decision`)."""

    state: BlessingState
    needs_override: bool


def blessing_decision(blessed: bool | None, require_blessing: bool) -> BlessingDecision:
    """``blessed``: the latest evaluation's verdict, None when the release was never evaluated."""
    if blessed is None:
        return BlessingDecision("not_evaluated", require_blessing)
    return BlessingDecision("blessed", False) if blessed else BlessingDecision("not_blessed", True)


def check_blessing(
    session: Session,
    rollout_id: str,
    release_id: str,
    actor: str,
    override: str | None,
    require_blessing: bool,
) -> RolloutBlessing:
    """The blessing gate for a rollout about to start (see the module doc); adds its record to the session.

    Raises:
        Conflict: the release needs an override (not blessed, or never evaluated with ``require_blessing``)
            and ``override`` is empty; the message names the evaluation and the way to override.
    """
    latest = latest_evaluation(session, release_id)
    decision = blessing_decision(None if latest is None else latest.blessed, require_blessing)
    reason = (override or "").strip()
    if decision.needs_override and not reason:
        if latest is None:
            raise Conflict(
                f"release {release_id} was never evaluated and this server requires a blessing; "
                "run `edgeota evaluate`, or start with an override reason (override_blessing, CLI --override-blessing)"
            )
        first = (latest.record.get("verdict") or {}).get("reasons") or ["(no reason recorded)"]
        raise Conflict(
            f"release {release_id} is not blessed: evaluation {latest.id} against {latest.baseline_release_id} "
            f"failed ({first[0]}); start with an override reason (override_blessing, CLI --override-blessing)"
        )
    overridden = decision.needs_override and bool(reason)
    row = session.get(RolloutBlessing, (rollout_id, release_id)) or RolloutBlessing(
        rollout_id=rollout_id, release_id=release_id
    )
    row.state = decision.state
    row.evaluation_id = None if latest is None else latest.id
    row.overridden = overridden
    row.override_reason = reason if overridden else ""
    row.checked_by = actor
    row.checked_at = utcnow()
    session.add(row)
    if overridden:
        audit.record(
            session,
            actor,
            "rollout.blessing_override",
            "rollout",
            rollout_id,
            None,
            {"release_id": release_id, "blessing": decision.state, "evaluation_id": row.evaluation_id},
            reason,
        )
    return row


_NOTABLE = {"not_blessed": 0, "not_evaluated": 1, "blessed": 2}


def blessing_json(session: Session, rollout_id: str) -> dict[str, Any] | None:
    """What the gate found when the rollout started (null before). With several releases (a bandit's arms), the
    most notable one: an override first, then not blessed, not evaluated, blessed (each stays in the audit log)."""
    rows = list(session.scalars(select(RolloutBlessing).where(RolloutBlessing.rollout_id == rollout_id)))
    if not rows:
        return None
    row = min(rows, key=lambda r: (not r.overridden, _NOTABLE.get(r.state, 3), r.release_id))
    return {
        "release_id": row.release_id,
        "state": row.state,
        "evaluation_id": row.evaluation_id,
        "overridden": row.overridden,
        "override_reason": row.override_reason,
        "checked_by": row.checked_by,
        "checked_at": row.checked_at.isoformat(),
    }
