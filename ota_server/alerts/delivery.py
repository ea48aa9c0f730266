"""Sending alert events after their commit: dataset exports first, then webhooks and commands.

- **Export** (rules with ``export = true``): the alert's release and profile samples since the window start,
  written by :func:`ota_server.services.datasets.export_dataset` with trigger ``alert:<id>`` and the drift
  report, into ``<alert_export_dir>/alert-<id>``; the folder (or the error) is recorded on the alert before any
  of its deliveries is sent, so a command always learns where the export is.
- **Webhook**: ``POST`` of the JSON payload with ``X-Edgeota-Timestamp`` and ``X-Edgeota-Signature``
  (:mod:`ota_server.alerts.signing`), retried with doubling back-off on connection errors, timeouts, 408, 429
  and 5xx, never after the target's ``deadline_seconds``; another 4xx fails at once (retrying cannot help).
- **Command**: ``argv`` run without a shell, the payload on stdin, an environment of ``PATH``, ``LANG`` and
  ``HOME`` (the server's own variables, which hold its secrets, are not passed on), the target's ``env`` and
  ``EDGEOTA_ALERT_ID``, ``_EVENT``, ``_RULE``, ``_KIND``, ``_SEVERITY``, ``_FINGERPRINT``, ``_FEATURES``,
  ``_EXPORT_DIR`` and ``_EXPORT_MANIFEST`` (the last two empty without an export). Exit 0 is delivered.

Every attempt is appended to the delivery row; a delivery ends ``delivered`` or ``failed``. A webhook whose
sending failed for a reason that may pass stays ``pending`` and is tried again in later rounds (1 to 15 minutes
apart) until ``retry_for`` after the event; a command is never re-run in a later round (it need not be idempotent).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from ota_server.alerts import signing
from ota_server.alerts.config import AlertRules, CommandTarget, WebhookTarget
from ota_server.alerts.records import Alert, AlertDelivery
from ota_server.models import utcnow

log = logging.getLogger("edgeota.server.alerts")
PAYLOAD_FORMAT = "edgeota-alert/1"
_RETRY_STATUS = {408, 425, 429}


@dataclass
class DeliveryEnv:
    """What sending needs besides the rules: sessions, where samples are and where exports go."""

    sessions: sessionmaker[Session]
    samples_root: Path
    export_root: Path
    cohort_label: str = "cohort"
    sleep: Callable[[float], None] = time.sleep
    http: httpx.Client | None = None
    metrics: Callable[[str], None] = field(default=lambda _name: None)


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def alert_json(alert: Alert) -> dict[str, Any]:
    """The alert as the API and the deliveries show it."""
    return {
        "id": alert.id,
        "fingerprint": alert.fingerprint,
        "rule": alert.rule,
        "kind": alert.kind,
        "severity": alert.severity,
        "state": alert.state,
        "scope": {
            "model_name": alert.model_name,
            "version": alert.version,
            "hardware_profile": alert.hardware_profile,
            "cohort": alert.cohort,
        },
        "feature": alert.feature,
        "features": list(alert.features or []),
        "summary": alert.summary,
        "value": alert.value,
        "threshold": alert.threshold,
        "first_seen": _iso(alert.first_seen),
        "last_seen": _iso(alert.last_seen),
        "evaluations": alert.evaluations,
        "resolved_at": _iso(alert.resolved_at),
        "resolve_reason": alert.resolve_reason,
        "acked_at": _iso(alert.acked_at),
        "acked_by": alert.acked_by,
        "export": {"state": alert.export_state, "path": alert.export_path, "error": alert.export_error},
        "details": alert.payload or {},
    }


def payload(alert: Alert, delivery: AlertDelivery, now: datetime) -> bytes:
    """The delivered JSON (compact, keys sorted: the signed bytes are exactly what is sent)."""
    body = {
        "format": PAYLOAD_FORMAT,
        "event": delivery.event,
        "delivery_id": delivery.delivery_id,
        "sent_at": now.isoformat(),
        "alert": alert_json(alert),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def _attempt(outcome: str, started: float, status: int | None = None, detail: str = "") -> dict[str, Any]:
    return {
        "at": utcnow().isoformat(),
        "outcome": outcome,
        "status": status,
        "detail": detail[:500],
        "ms": round((time.monotonic() - started) * 1000, 1),
    }


def send_webhook(
    target: WebhookTarget,
    secret: bytes,
    body: bytes,
    delivery_id: str,
    event: str,
    http: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[bool, list[dict[str, Any]]]:
    """POST ``body`` until accepted, a permanent refusal, ``max_attempts`` or the deadline; (delivered, attempts).

    Each attempt is signed afresh (its own timestamp), so a late retry is not refused as a replay."""
    client = http or httpx.Client()
    deadline = time.monotonic() + target.deadline_seconds
    attempts: list[dict[str, Any]] = []
    wait = target.backoff_seconds
    try:
        for n in range(target.max_attempts):
            if n:
                if time.monotonic() + wait >= deadline:
                    break
                sleep(wait)
                wait *= 2
            started = time.monotonic()
            ts = int(time.time())
            headers = {
                "Content-Type": "application/json",
                signing.TIMESTAMP_HEADER: str(ts),
                signing.SIGNATURE_HEADER: signing.sign(secret, ts, body),
                signing.DELIVERY_HEADER: delivery_id,
                signing.EVENT_HEADER: event,
            }
            timeout = max(0.1, min(target.timeout_seconds, deadline - started))
            try:
                resp = client.post(target.url, content=body, headers=headers, timeout=timeout)
            except httpx.HTTPError as exc:
                attempts.append(_attempt("error", started, None, f"{type(exc).__name__}: {exc}"))
                continue
            if 200 <= resp.status_code < 300:
                attempts.append(_attempt("delivered", started, resp.status_code))
                return True, attempts
            attempts.append(_attempt("refused", started, resp.status_code, resp.text[:200]))
            if resp.status_code < 500 and resp.status_code not in _RETRY_STATUS:
                break
        return False, attempts
    finally:
        if http is None:
            client.close()


def command_env(target: CommandTarget, alert: Alert, event: str) -> dict[str, str]:
    """The command's whole environment (see the module docstring)."""
    env = {k: os.environ[k] for k in ("PATH", "LANG", "HOME") if k in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(target.env)
    manifest = str(Path(alert.export_path) / "_manifest.json") if alert.export_path else ""
    env.update(
        {
            "EDGEOTA_ALERT_ID": alert.id,
            "EDGEOTA_ALERT_EVENT": event,
            "EDGEOTA_ALERT_RULE": alert.rule,
            "EDGEOTA_ALERT_KIND": alert.kind,
            "EDGEOTA_ALERT_SEVERITY": alert.severity,
            "EDGEOTA_ALERT_FINGERPRINT": alert.fingerprint,
            "EDGEOTA_ALERT_FEATURES": ",".join(alert.features or []),
            "EDGEOTA_ALERT_EXPORT_DIR": alert.export_path or "",
            "EDGEOTA_ALERT_EXPORT_MANIFEST": manifest,
        }
    )
    return env


def run_command(
    target: CommandTarget, body: bytes, env: dict[str, str], sleep: Callable[[float], None] = time.sleep
) -> tuple[bool, list[dict[str, Any]]]:
    """Run ``target.argv`` with ``body`` on stdin until it exits 0 or ``max_attempts``; (delivered, attempts)."""
    attempts: list[dict[str, Any]] = []
    wait = target.backoff_seconds
    for n in range(target.max_attempts):
        if n:
            sleep(wait)
            wait *= 2
        started = time.monotonic()
        try:
            done = subprocess.run(
                target.argv, input=body, env=env, capture_output=True, timeout=target.timeout_seconds, check=False
            )
        except FileNotFoundError as exc:
            attempts.append(_attempt("error", started, None, f"cannot run {target.argv[0]}: {exc.strerror}"))
            break  # a missing program does not appear by retrying
        except subprocess.TimeoutExpired:
            attempts.append(_attempt("error", started, None, f"timed out after {target.timeout_seconds:g} s"))
            continue
        except OSError as exc:
            attempts.append(_attempt("error", started, None, f"cannot run {target.argv[0]}: {exc}"))
            break
        tail = (done.stderr or done.stdout or b"").decode(errors="replace").strip()[-300:]
        if done.returncode == 0:
            attempts.append(_attempt("delivered", started, 0, tail))
            return True, attempts
        attempts.append(_attempt("refused", started, done.returncode, tail))
    return False, attempts


def run_exports(env: DeliveryEnv, rules: AlertRules) -> int:
    """Export for every alert whose export is pending; record the folder or the error. Returns how many ran."""
    from ota_server.services.datasets import ExportQuery, export_dataset

    with env.sessions() as session:
        pending = list(session.scalars(select(Alert).where(Alert.export_state == "pending").order_by(Alert.first_seen)))
    for alert in pending:
        rule = rules.by_name.get(alert.rule)
        window = rule.effective_window if rule is not None else 3600.0
        out = env.export_root / f"alert-{alert.id}"
        drift = (alert.payload or {}).get("drift_report")
        query = ExportQuery(
            model_name=alert.model_name,
            version=alert.version,
            profile=alert.hardware_profile,
            since=alert.first_seen - timedelta(seconds=window),
            cohort_label=env.cohort_label,
            trigger=f"alert:{alert.id}",
            drift_report={"alert": alert.summary, **drift} if isinstance(drift, dict) else {"alert": alert.summary},
        )
        state, path, error = "done", str(out), ""
        try:
            out.mkdir(parents=True, exist_ok=True)
            with env.sessions() as session:
                export_dataset(session, env.samples_root, query, out)
        except (EdgeotaError, OSError, ValueError) as exc:
            state, path, error = "failed", "", (str(exc).splitlines() or [type(exc).__name__])[0][:500]
        with env.sessions() as session, session.begin():
            row = session.get(Alert, alert.id)
            if row is not None:
                row.export_state, row.export_path, row.export_error = state, path or None, error or None
        env.metrics(f"alert_exports_{state}")
        log_event(log, "alert_export", alert=alert.id, state=state, path=path or None, error=error or None)
    return len(pending)


def permanent(attempts: list[dict[str, Any]]) -> bool:
    """True when the last attempt was refused for a reason retrying cannot fix (a 4xx other than 408/425/429)."""
    last = attempts[-1] if attempts else {}
    status = last.get("status")
    return last.get("outcome") == "refused" and isinstance(status, int) and status < 500 and status not in _RETRY_STATUS


def _next_state(
    delivery: AlertDelivery, ok: bool, attempts: list[dict[str, Any]], rules: AlertRules, now: datetime
) -> tuple[str, datetime | None]:
    """(state, next attempt time): webhooks that failed transiently stay pending within their ``retry_for``."""
    if ok:
        return "delivered", None
    target = rules.spec.webhooks.get(delivery.target) if delivery.target_kind == "webhook" else None
    if target is None or permanent(attempts) or now >= delivery.created_at + timedelta(seconds=target.retry_for):
        return "failed", None
    wait = min(900.0, max(60.0, (now - delivery.created_at).total_seconds()))  # roughly doubling, 1 to 15 min
    return "pending", now + timedelta(seconds=wait)


def send_pending(env: DeliveryEnv, rules: AlertRules) -> int:
    """Send every pending delivery that is due and whose alert has no export still pending; returns how many were
    tried. A webhook that failed transiently stays pending (see ``WebhookTarget.retry_for``)."""
    now = utcnow()
    with env.sessions() as session:
        ids = list(
            session.scalars(
                select(AlertDelivery.id)
                .join(Alert, Alert.id == AlertDelivery.alert_id)
                .where(
                    AlertDelivery.state == "pending",
                    Alert.export_state != "pending",
                    or_(AlertDelivery.next_attempt_at.is_(None), AlertDelivery.next_attempt_at <= now),
                )
                .order_by(AlertDelivery.id)
            )
        )
    for delivery_id in ids:
        with env.sessions() as session:
            delivery = session.get(AlertDelivery, delivery_id)
            alert = session.get(Alert, delivery.alert_id) if delivery is not None else None
        if delivery is None or alert is None or delivery.state != "pending":
            continue
        ok, attempts = _send_one(env, rules, alert, delivery)
        state, next_at = _next_state(delivery, ok, attempts, rules, utcnow())
        with env.sessions() as session, session.begin():
            row = session.get(AlertDelivery, delivery_id)
            if row is not None:
                row.attempts = [*(row.attempts or []), *attempts]
                row.state, row.next_attempt_at, row.updated_at = state, next_at, utcnow()
        env.metrics(f"alert_deliveries_{state}")
        log_event(
            log,
            "alert_delivery",
            logging.INFO if ok else logging.WARNING,
            alert=alert.id,
            target=delivery.target,
            alert_event=delivery.event,
            state=state,
            attempts=len(attempts),
        )
    return len(ids)


def _send_one(
    env: DeliveryEnv, rules: AlertRules, alert: Alert, delivery: AlertDelivery
) -> tuple[bool, list[dict[str, Any]]]:
    body = payload(alert, delivery, utcnow())
    if delivery.target_kind == "webhook" and delivery.target in rules.spec.webhooks:
        target = rules.spec.webhooks[delivery.target]
        return send_webhook(
            target, rules.secret(delivery.target), body, delivery.delivery_id, delivery.event, env.http, env.sleep
        )
    if delivery.target_kind == "command" and delivery.target in rules.spec.commands:
        command = rules.spec.commands[delivery.target]
        return run_command(command, body, command_env(command, alert, delivery.event), env.sleep)
    return False, [_attempt("error", time.monotonic(), None, f"target {delivery.target} is no longer configured")]
