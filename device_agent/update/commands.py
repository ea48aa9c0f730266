"""Signed commands from the server (contract section 5): verify, dedupe, and act or queue.

:class:`CommandHandler` is the agent's command path, for MQTT's network thread and for the update
worker (a queued assignment). It never raises for a bad command: a command without a valid
signature for this device is ignored, counted and logged, and reported as ``failed`` when it names
a deployment of this device that the agent does not know (except an expired one: a stale copy,
which the server re-sends fresh after the next check-in).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from device_agent.settings import AgentConfig
from device_agent.store import SHADOW_SLOT, StateStore
from device_agent.transport.outbox import Outbox
from device_agent.update import machine
from device_agent.update.checks import Verdict, decide
from device_agent.update.executor import Executor
from device_agent.update.machine import Report, Step
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Ack, Assignment, CheckinRequest, ShadowStop, SignedCommand, verify_command
from edgeota_contract.states import DeploymentState, ReasonCode

log = logging.getLogger("device_agent")


class CommandHandler:
    """Acts on signed commands for one started agent. Thread-safe (one command at a time)."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        outbox: Outbox,
        executor: Executor,
        *,
        wake_worker: Callable[[], None],
        send_checkin: Callable[[], None],
        flush: Callable[[], None],
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.store = store
        self.outbox = outbox
        self.executor = executor
        self.rejected = 0
        self._wake_worker = wake_worker
        self._send_checkin = send_checkin
        self._flush = flush
        self._lock = threading.RLock()  # MQTT's thread and the update worker (queued assignments) both call in

    def handle(self, payload: bytes) -> None:
        """Act on one signed command; never raises for a bad one (see the module docstring)."""
        with self._lock:
            self._handle(payload)

    def _handle(self, payload: bytes) -> None:
        try:
            command = verify_command(payload, self.config.server_keys, self.device_id)
        except EdgeotaError as exc:
            self.rejected += 1
            log_event(
                log,
                "command_rejected",
                level=logging.WARNING,
                device=self.device_id,
                reason=exc.reason.value,
                detail=str(exc),
            )
            self._report_unverified(payload, exc)
            return
        if isinstance(command, Ack):
            self.outbox.acked(command.msg_ids)
        elif isinstance(command, CheckinRequest):
            self._send_checkin()
        elif isinstance(command, ShadowStop):
            self._shadow_stop(command)
        else:
            self._assignment(command, payload)

    def _shadow_stop(self, command: ShadowStop) -> None:
        state = self.store.state
        if command.nonce in state.used_nonces:
            return
        shadow = state.slots.get(SHADOW_SLOT)
        if shadow is not None and shadow.model_name == command.model_name:
            self.executor.stop_shadow()
            log_event(log, "shadow_stopped", model=command.model_name)
        with self.store.update() as st:
            st.remember_nonce(command.nonce)

    def _report_unverified(self, payload: bytes, exc: EdgeotaError) -> None:
        """Report a refused assignment naming a deployment of this device that we do not already know."""
        try:
            body = json.loads(SignedCommand.model_validate_json(payload).body)
            assignment = Assignment.model_validate(body)
        except Exception:
            return
        if assignment.device_id != self.device_id or exc.reason == ReasonCode.WRONG_DEVICE:
            return
        if exc.reason == ReasonCode.ASSIGNMENT_EXPIRED:
            # A stale copy (e.g. queued by the broker while offline): the server re-sends a fresh one
            # after our check-in, so failing the deployment here would be wrong.
            return
        state = self.store.state
        known = state.finished_by_id(assignment.deployment_id) is not None or (
            state.deployment is not None and state.deployment.deployment_id == assignment.deployment_id
        )
        if not known:
            self._report_now(assignment, Report(DeploymentState.FAILED, exc.reason, str(exc)))

    def _report_now(self, assignment: Assignment, report: Report) -> None:
        with self.store.update() as st:
            st.add_report(self.outbox.status(assignment, report), self.config.settings.outbox_max_reports)
        self._flush()

    def _assignment(self, a: Assignment, payload: bytes) -> None:
        state = self.store.state
        decision = decide(a, state, self.config.hardware_profile)
        log_event(
            log,
            "assignment_received",
            deployment=a.deployment_id,
            verdict=decision.verdict.value,
            reason=decision.reason.value,
        )
        if decision.verdict == Verdict.CONTINUE:
            self._wake_worker()
        elif decision.verdict == Verdict.REREPORT:
            final = state.finished_by_id(a.deployment_id)
            assert final is not None
            self._report_now(a, Report(final.state, final.reason, final.detail))
        elif decision.verdict == Verdict.QUEUE:
            with self.store.update() as st:
                st.pending_command = payload.decode("utf-8")
            self._wake_worker()  # the worker may have just finished: it must see the queued command
        elif decision.verdict == Verdict.START:
            with self.store.update() as st:
                st.remember_nonce(a.nonce)
                target = SHADOW_SLOT if a.mode == "shadow" else st.inactive_slot()
                known_good = self.config.settings.fast_rollback and st.known_good(a.bundle_sha256)
                st.deployment = machine.start(a, target, st.active_slot, known_good=known_good)
            self._wake_worker()
        elif decision.verdict == Verdict.ALREADY_INSTALLED:
            self._finish_without_update(a, DeploymentState.COMMITTED, ReasonCode.OK, decision.detail)
        elif decision.reason == ReasonCode.ASSIGNMENT_REPLAYED:
            self._report_now(a, Report(DeploymentState.FAILED, decision.reason, decision.detail))
        else:
            self._finish_without_update(a, DeploymentState.FAILED, decision.reason, decision.detail)

    def _finish_without_update(self, a: Assignment, outcome: DeploymentState, reason: ReasonCode, detail: str) -> None:
        dep = machine.Deployment(
            assignment=a, step=Step.DONE, target_slot="-", outcome=outcome, reason=reason, detail=detail
        )
        with self.store.update() as st:
            st.remember_nonce(a.nonce)
        self.executor.commit_transition(machine.Transition(dep, (Report(outcome, reason, detail),)))
        self._flush()
