"""Telemetry for rollout gates: read the aggregates, evaluate the gates with the pure rule, say what they know.

:func:`rollout_gate_results` gathers :class:`~ota_server.rollout.gate_results.GateInputs` from the
telemetry aggregates (:mod:`ota_server.services.telemetry_aggregates`, a few rows per bundle and time
bucket, never window payloads) and the bundles' reference stats, and returns one
:class:`~ota_server.rollout.gate_results.GateResult` per gate the plan sets.

What each gate reads:

- the release's telemetry: every aggregate of the release's bundles (whichever device sent it);
- the latency baseline: the aggregates of the bundles the rollout's devices ran before
  (``deployments.previous_bundle_sha256``) on the release's hardware profiles;
- the shadow gate: aggregates of windows that shadowed one of the release's bundles;
- the drift gate: per bundle, its ``reference_stats.json`` input features against the observed ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from edgeota_contract.manifest import REFERENCE_STATS_FILE
from edgeota_contract.telemetry import ReferenceStats
from ota_server.artifacts import ArtifactStore
from ota_server.drift import DriftKey, feature_key, reference_inputs
from ota_server.models import Bundle, Deployment, Rollout, TelemetryAggregate
from ota_server.rollout.gate_results import DriftInput, GateInputs, GateResult, configured, evaluate_gates
from ota_server.rollout.plan import Plan
from ota_server.rollout.telemetry_gates import TelemetryTotals, merge_all
from ota_server.services.bundle_documents import bundle_document
from ota_server.services.telemetry_aggregates import bucket_start, read_aggregates

_AGG = TelemetryAggregate


def reference_stats(store: ArtifactStore, sha256: str) -> ReferenceStats | None:
    """A stored bundle's ``reference_stats.json`` (None when absent or unreadable); cached per sha."""
    return bundle_document(store, sha256, REFERENCE_STATS_FILE, ReferenceStats)


def observed_inputs(totals: TelemetryTotals) -> dict[DriftKey, list[int]]:
    """The observed input feature histograms by drift key."""
    return {feature_key(name, feature): counts for (name, feature), counts in totals.features.items()}


def same_bins(reference: dict[DriftKey, list[int]], observed: dict[DriftKey, list[int]]) -> dict[DriftKey, list[int]]:
    """``observed`` without histograms whose bucket count differs from the reference's (another bin layout)."""
    return {k: v for k, v in observed.items() if k not in reference or len(reference[k]) == len(v)}


def _per_sha(session: Session, shas: Iterable[str], profiles: set[str] | None = None) -> dict[str, TelemetryTotals]:
    """The aggregates of ``shas`` (on ``profiles``) merged per bundle sha (decoded rows are cached)."""
    shas = set(shas)
    if not shas:
        return {}
    where = [_AGG.bundle_sha256.in_(shas)]
    if profiles is not None:
        where.append(_AGG.hardware_profile.in_(profiles))
    out: dict[str, TelemetryTotals] = {}
    for row, totals in read_aggregates(session, *where):
        out.setdefault(row.bundle_sha256, TelemetryTotals()).merge(totals)
    return out


def _counts(session: Session, shas: set[str]) -> TelemetryTotals:
    """Requests, errors and non-finite outputs of ``shas``, summed by the database."""
    if not shas:
        return TelemetryTotals()
    row = session.execute(
        select(
            func.coalesce(func.sum(_AGG.requests), 0),
            func.coalesce(func.sum(_AGG.errors), 0),
            func.coalesce(func.sum(_AGG.nan_outputs), 0),
            func.coalesce(func.sum(_AGG.windows), 0),
        ).where(_AGG.bundle_sha256.in_(shas))
    ).one()
    return TelemetryTotals(requests=int(row[0]), errors=int(row[1]), nan_outputs=int(row[2]), windows=int(row[3]))


def _shadow(session: Session, candidates: set[str]) -> tuple[int, int]:
    if not candidates:
        return 0, 0
    compared, agree = session.execute(
        select(func.coalesce(func.sum(_AGG.shadow_compared), 0), func.coalesce(func.sum(_AGG.shadow_agree), 0)).where(
            _AGG.shadow_sha256.in_(candidates)
        )
    ).one()
    return int(compared), int(agree)


def gate_inputs(session: Session, store: ArtifactStore, rollout: Rollout, plan: Plan) -> GateInputs:
    """What the rollout's gates read, from the aggregates (histograms only for the gates that need them)."""
    names = configured(plan.gates)
    bundles = list(
        session.execute(select(Bundle.sha256, Bundle.hardware_profile).where(Bundle.release_id == rollout.release_id))
    )
    new_shas = {sha for sha, _ in bundles}
    needs_histograms = "drift" in names
    if needs_histograms or "p95_latency_ratio" in names:
        parts = _per_sha(session, new_shas)
        new = merge_all(parts)
    else:
        parts, new = {}, _counts(session, new_shas)
    baseline = None
    if "p95_latency_ratio" in names:
        old_shas = set(
            session.scalars(
                select(Deployment.previous_bundle_sha256)
                .where(
                    Deployment.rollout_id == rollout.id,
                    Deployment.mode == "install",
                    Deployment.previous_bundle_sha256.is_not(None),
                )
                .distinct()
            )
        )
        profiles = {p for _, p in bundles}
        baseline = merge_all(_per_sha(session, {s for s in old_shas if s} - new_shas, profiles))
    drift: dict[str, DriftInput] = {}
    if "drift" in names:
        for sha in sorted(new_shas):
            stats = reference_stats(store, sha)
            if stats is None or not stats.features:
                continue
            reference = reference_inputs(stats)
            observed = observed_inputs(parts[sha]) if sha in parts else {}
            drift[sha] = DriftInput(reference, same_bins(reference, observed))
    shadow = _shadow(session, new_shas) if "shadow_agreement" in names else (0, 0)
    return GateInputs(new=new, baseline=baseline, drift=drift, shadow=shadow)


def rollout_gate_results(session: Session, store: ArtifactStore, rollout: Rollout) -> tuple[GateResult, ...]:
    """Every telemetry gate of the rollout's plan, judged now (empty when the plan sets none)."""
    plan = Plan.from_json(rollout.plan)
    if not configured(plan.gates):
        return ()
    return evaluate_gates(plan.gates, gate_inputs(session, store, rollout, plan))


def record_gate_results(rollout: Rollout, results: tuple[GateResult, ...], now: datetime) -> None:
    """Keep the latest verdicts on the rollout row for the status API (written only when they change)."""
    gates = [g.as_json() for g in results]
    current = rollout.gate_results or {}
    if current.get("gates") == gates and current.get("stage") == rollout.current_stage:
        return
    rollout.gate_results = {"stage": rollout.current_stage, "at": now.isoformat(), "gates": gates}


def attribution(
    session: Session, profiles: set[str] | None = None, since: datetime | None = None, bucket_seconds: int = 300
) -> dict[str, Any]:
    """Version attribution coverage: the share of requests whose bundle sha names a stored bundle (goal: 1.0).

    ``profiles``: only these hardware profiles; ``since``: from the bucket holding this time on.
    """
    stmt = select(func.coalesce(func.sum(_AGG.requests), 0), func.coalesce(func.sum(_AGG.attributed_requests), 0))
    if profiles is not None:
        stmt = stmt.where(_AGG.hardware_profile.in_(profiles))
    if since is not None:
        stmt = stmt.where(_AGG.bucket_start >= bucket_start(since, bucket_seconds))
    requests, known = session.execute(stmt).one()
    return coverage_json(int(requests), int(known))


def coverage_json(requests: int, attributed: int) -> dict[str, Any]:
    """``{"requests", "attributed_requests", "coverage"}`` (coverage None without requests)."""
    return {
        "requests": requests,
        "attributed_requests": attributed,
        "coverage": attributed / requests if requests else None,
    }
