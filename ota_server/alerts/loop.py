"""The alert loop: in the server's core process (beside the rollout engine), one round every
``alert_eval_seconds`` while this process holds the ``alerts`` lease.

A round is: evaluate and apply the lifecycle in one transaction (:func:`ota_server.alerts.service.evaluate_round`),
commit, then run pending exports and send pending deliveries (:mod:`ota_server.alerts.delivery`). With several
server processes on one database, the lease (a row in ``engine_lease``, like the engine's) lets one evaluate at a
time, so two processes never fire the same alert twice.
"""

from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from edgeota_contract.logs import log_event
from ota_server.alerts.config import AlertRules, load_rules
from ota_server.alerts.delivery import DeliveryEnv, run_exports, send_pending
from ota_server.alerts.service import RoundResult, evaluate_round
from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.models import EngineLease, utcnow

log = logging.getLogger("edgeota.server.alerts")
LEASE_NAME = "alerts"
LEASE_FLOOR_SECONDS = 90.0


def rules_from_settings(settings: Settings) -> AlertRules | None:
    """The configured rules (None without ``alert_rules_file``). Raises ContractError (one line) when invalid."""
    if settings.alert_rules_file is None:
        return None
    return load_rules(settings.alert_rules_file)


def export_root(settings: Settings) -> str:
    return str(settings.alert_export_dir or settings.data_dir / "alert-exports")


def delivery_env(ctx: ServerContext) -> DeliveryEnv:
    from pathlib import Path

    from ota_server.services.samples import samples_root

    return DeliveryEnv(
        sessions=ctx.sessions,
        samples_root=samples_root(ctx.settings.data_dir),
        export_root=Path(export_root(ctx.settings)),
        cohort_label=ctx.settings.telemetry_cohort_label or "cohort",
        metrics=ctx.metrics.inc,
    )


def run_round(ctx: ServerContext, rules: AlertRules, env: DeliveryEnv | None = None) -> RoundResult:
    """One round: evaluate + commit, then exports, then deliveries (sent only after the commit)."""
    with ctx.sessions() as session, session.begin():
        result = evaluate_round(session, ctx.store, rules, utcnow(), ctx.settings.telemetry_bucket_seconds)
    ctx.metrics.inc("alert_rounds")
    if result.suppressed:
        ctx.metrics.inc("alerts_suppressed", result.suppressed)
    if result.fired or result.resolved:
        log_event(log, "alerts_changed", fired=result.fired, resolved=result.resolved, suppressed=result.suppressed)
    env = env or delivery_env(ctx)
    run_exports(env, rules)
    send_pending(env, rules)
    return result


def acquire(ctx: ServerContext, holder: str) -> bool:
    """Take or renew the alerts lease. It lasts at least two rounds and ``LEASE_FLOOR_SECONDS``: a round's deliveries
    may take a webhook's whole deadline, and another server must not take over (and send the same pending deliveries)
    meanwhile; a dead holder is replaced after at most that long, which alerting can afford."""
    from ota_server.engine import acquire_lease

    seconds = max(ctx.settings.engine_lease_seconds, 2 * ctx.settings.alert_eval_seconds, LEASE_FLOOR_SECONDS)
    return acquire_lease(ctx, holder, LEASE_NAME, seconds)


class AlertLoop:
    """Background thread running :func:`run_round` while it holds the lease; survives database errors."""

    def __init__(self, ctx: ServerContext, rules: AlertRules) -> None:
        self.ctx = ctx
        self.rules = rules
        self.holder = f"alerts-{uuid.uuid4().hex[:12]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="alert-loop", daemon=True)
        self._thread.start()
        log_event(log, "alert_loop_started", rules=len(self.rules.rules), source=self.rules.source)

    def stop(self) -> None:
        """Stop after the current round; give the lease up so another server takes over at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            with self.ctx.sessions() as session, session.begin():
                lease = session.get(EngineLease, LEASE_NAME)
                if lease is not None and lease.holder == self.holder:
                    lease.expires_at = utcnow() - timedelta(seconds=1)
        except Exception as exc:  # stopping must not fail on a database that is already gone
            log_event(log, "alert_lease_release_failed", logging.WARNING, error=repr(exc))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if acquire(self.ctx, self.holder):
                    run_round(self.ctx, self.rules)
            except Exception as exc:  # the loop must survive a database hiccup or a bad export
                log_event(log, "alert_round_failed", logging.ERROR, error=repr(exc))
            self._stop.wait(self.ctx.settings.alert_eval_seconds)
