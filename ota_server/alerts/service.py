"""Alerts and the database: one evaluation round in one transaction, listing, acknowledgement.

:func:`evaluate_round` reads the telemetry aggregates (never the window rows) of each rule's model over the
rule's window, and field accuracy for the accuracy kinds, judges them with the pure
:func:`ota_server.alerts.evaluate.evaluate_rule`, decides with :func:`ota_server.alerts.lifecycle.decide`, and
writes the alerts and their ``pending`` deliveries in the caller's transaction. Nothing is sent here: the
caller commits, then :mod:`ota_server.alerts.delivery` sends what is pending.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ota_server.alerts.config import AlertRule, AlertRules
from ota_server.alerts.evaluate import AccuracyLike, GroupData, Observation, Scope, evaluate_rule
from ota_server.alerts.lifecycle import Fire, OpenAlert, Refresh, Resolve, Suppress, decide
from ota_server.alerts.records import OPEN_STATES, STATES, Alert, AlertDelivery
from ota_server.artifacts import ArtifactStore
from ota_server.drift import reference_inputs, reference_outputs
from ota_server.errors import Conflict, InvalidRequest, NotFound
from ota_server.models import TelemetryAggregate
from ota_server.rollout.telemetry_gates import TelemetryTotals
from ota_server.services import audit
from ota_server.services.telemetry import reference_stats
from ota_server.services.telemetry_aggregates import bucket_start, read_aggregates

AccuracySource = Callable[..., Sequence[AccuracyLike]]
"""``field_accuracy(session, *, model_name, version, since, cohort, store, bucket_seconds)``
(:func:`ota_server.services.accuracy.field_accuracy`)."""


@dataclass
class RoundResult:
    """What one round did (for logs, counters and tests)."""

    fired: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)
    suppressed: int = 0
    observations: int = 0


def default_accuracy_source() -> AccuracySource:
    from ota_server.services.accuracy import field_accuracy

    return field_accuracy


def _groups(
    session: Session, store: ArtifactStore, rule: AlertRule, since: datetime, cache: dict[Any, list[GroupData]]
) -> list[GroupData]:
    """The rule's model over the window, merged per (model, version, profile, cohort), with drift references.

    Rules of the same model, scope filters and window share one read (``cache``)."""
    key = (rule.model, rule.version, rule.profile, rule.cohort, since)
    if key in cache:
        return cache[key]
    agg = TelemetryAggregate
    where: list[Any] = [agg.model_name == rule.model, agg.bucket_start >= since]
    if rule.version is not None:
        where.append(agg.version == rule.version)
    if rule.profile is not None:
        where.append(agg.hardware_profile == rule.profile)
    if rule.cohort is not None:
        where.append(agg.cohort == rule.cohort)
    merged: dict[Scope, TelemetryTotals] = {}
    shas: dict[Scope, set[str]] = {}
    for row, totals in read_aggregates(session, *where):
        scope: Scope = (row.model_name, row.version, row.hardware_profile, row.cohort)
        merged.setdefault(scope, TelemetryTotals()).merge(totals)
        shas.setdefault(scope, set()).add(row.bundle_sha256)
    out = []
    for scope in sorted(merged):
        ref_in: dict[Any, list[int]] = {}
        ref_out: dict[Any, list[int]] = {}
        if rule.kind == "drift":
            for sha in sorted(shas[scope]):
                stats = reference_stats(store, sha)
                if stats is not None:
                    ref_in, ref_out = reference_inputs(stats), reference_outputs(stats)
                    break
        out.append(GroupData(scope, merged[scope], ref_in, ref_out))
    cache[key] = out
    return out


def observe(
    session: Session,
    store: ArtifactStore,
    rules: AlertRules,
    now: datetime,
    bucket_seconds: int,
    accuracy: AccuracySource | None = None,
) -> list[Observation]:
    """Every rule judged now (reads only)."""
    cache: dict[Any, list[GroupData]] = {}
    out: list[Observation] = []
    for rule in rules.rules:
        since = bucket_start(now - timedelta(seconds=rule.effective_window), bucket_seconds)
        if rule.kind in ("accuracy", "estimated_accuracy"):
            source = accuracy or default_accuracy_source()
            rows = source(
                session,
                model_name=rule.model,
                version=rule.version,
                since=since,
                cohort=rule.cohort,
                store=store,
                bucket_seconds=bucket_seconds,
            )
            out.extend(evaluate_rule(rule, (), rows))
        else:
            out.extend(evaluate_rule(rule, _groups(session, store, rule, since, cache)))
    return out


def _open(session: Session) -> list[Alert]:
    return list(session.scalars(select(Alert).where(Alert.state.in_(OPEN_STATES)).with_for_update()))


def _last_resolved(session: Session, fingerprints: set[str]) -> dict[str, datetime]:
    if not fingerprints:
        return {}
    rows = session.execute(
        select(Alert.fingerprint, func.max(Alert.resolved_at))
        .where(Alert.fingerprint.in_(fingerprints), Alert.resolved_at.is_not(None))
        .group_by(Alert.fingerprint)
    )
    return {fp: at for fp, at in rows if at is not None}


def _queue(session: Session, rules: AlertRules, alert: Alert, event: str) -> None:
    rule = rules.by_name.get(alert.rule)
    if rule is None or (event == "resolved" and not rule.send_resolved):
        return
    for target in rule.deliver:
        kind = "webhook" if target in rules.spec.webhooks else "command"
        session.add(
            AlertDelivery(
                alert_id=alert.id,
                event=event,
                target=target,
                target_kind=kind,
                delivery_id=uuid.uuid4().hex,
                state="pending",
                attempts=[],
            )
        )


def _update(alert: Alert, obs: Observation, now: datetime) -> None:
    alert.last_seen = now
    alert.summary = obs.summary
    alert.value = obs.value
    alert.threshold = obs.threshold  # the rule's current one (a restart may have changed it)
    alert.features = list(obs.features)
    alert.payload = obs.details


def evaluate_round(
    session: Session,
    store: ArtifactStore,
    rules: AlertRules,
    now: datetime,
    bucket_seconds: int = 300,
    accuracy: AccuracySource | None = None,
) -> RoundResult:
    """Judge every rule and apply the lifecycle in the caller's transaction (commit it, then deliver).

    Open alerts are locked (``FOR UPDATE`` on PostgreSQL) so an operator's acknowledgement and a round do not
    overwrite each other.
    """
    observations = observe(session, store, rules, now, bucket_seconds, accuracy)
    open_rows = {a.id: a for a in _open(session)}
    views = [OpenAlert(a.id, a.fingerprint, a.rule) for a in open_rows.values()]
    fps = {o.fingerprint for o in observations if o.status == "firing"}
    actions = decide(observations, views, _last_resolved(session, fps), rules.by_name, now)
    result = RoundResult(observations=len(observations))
    for action in actions:
        if isinstance(action, Fire):
            result.fired.append(_fire(session, rules, action.observation, now).id)
        elif isinstance(action, Refresh):
            alert = open_rows[action.alert_id]
            _update(alert, action.observation, now)
            alert.evaluations += 1
            result.refreshed.append(alert.id)
        elif isinstance(action, Resolve):
            alert = open_rows[action.alert_id]
            if action.observation is not None:  # keep what fired (summary, features); note what cleared it
                cleared = {"summary": action.observation.summary, "value": action.observation.value}
                alert.payload = {**(alert.payload or {}), "cleared": cleared}
            alert.state, alert.resolved_at, alert.resolve_reason = "resolved", now, action.reason
            _queue(session, rules, alert, "resolved")
            result.resolved.append(alert.id)
        elif isinstance(action, Suppress):
            result.suppressed += 1
    session.flush()
    return result


def _fire(session: Session, rules: AlertRules, obs: Observation, now: datetime) -> Alert:
    rule = rules.by_name[obs.rule]
    model, version, profile, cohort = obs.scope
    alert = Alert(
        id=uuid.uuid4().hex,
        fingerprint=obs.fingerprint,
        rule=rule.name,
        kind=rule.kind,
        severity=rule.severity,
        state="firing",
        model_name=model,
        version=version,
        hardware_profile=profile,
        cohort=cohort,
        feature=obs.feature,
        features=list(obs.features),
        summary=obs.summary,
        value=obs.value,
        threshold=obs.threshold,
        first_seen=now,
        last_seen=now,
        evaluations=1,
        payload=obs.details,
        export_state="pending" if rule.export else "none",
    )
    session.add(alert)
    session.flush()
    _queue(session, rules, alert, "fired")
    return alert


# ---------------------------------------------------------------- the API's side


def list_alerts(
    session: Session, state: str | None = None, rule: str | None = None, limit: int = 100, offset: int = 0
) -> list[Alert]:
    """Alerts newest first; ``state`` is one of :data:`STATES` or ``open`` (firing or acknowledged).

    Raises InvalidRequest for another state."""
    stmt = select(Alert)
    if state == "open":
        stmt = stmt.where(Alert.state.in_(OPEN_STATES))
    elif state is not None:
        if state not in STATES:
            raise InvalidRequest(f"state must be one of open, {', '.join(STATES)}")
        stmt = stmt.where(Alert.state == state)
    if rule is not None:
        stmt = stmt.where(Alert.rule == rule)
    return list(session.scalars(stmt.order_by(Alert.first_seen.desc(), Alert.id).offset(offset).limit(limit)))


def get_alert(session: Session, alert_id: str, lock: bool = False) -> Alert:
    """Raises NotFound."""
    stmt = select(Alert).where(Alert.id == alert_id)
    alert = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if alert is None:
        raise NotFound(f"alert {alert_id} not found")
    return alert


def deliveries_of(session: Session, alert_ids: Iterable[str]) -> dict[str, list[AlertDelivery]]:
    ids = list(alert_ids)
    out: dict[str, list[AlertDelivery]] = {i: [] for i in ids}
    if ids:
        stmt = select(AlertDelivery).where(AlertDelivery.alert_id.in_(ids)).order_by(AlertDelivery.id)
        for d in session.scalars(stmt):
            out[d.alert_id].append(d)
    return out


def acknowledge(session: Session, alert_id: str, actor: str, reason: str, now: datetime) -> Alert:
    """``firing`` -> ``acknowledged``, audited (``alert.ack``), in the caller's transaction.

    Raises:
        NotFound: no such alert.
        Conflict: the alert is already acknowledged or resolved.
    """
    alert = get_alert(session, alert_id, lock=True)
    if alert.state != "firing":
        by = f" by {alert.acked_by}" if alert.state == "acknowledged" else ""
        raise Conflict(f"alert {alert_id} is already {alert.state}{by}")
    before = {"state": alert.state}
    alert.state, alert.acked_at, alert.acked_by, alert.ack_reason = "acknowledged", now, actor, reason
    audit.record(session, actor, "alert.ack", "alert", alert.id, before, {"state": alert.state}, reason)
    session.flush()
    return alert
