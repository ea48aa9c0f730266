"""Everything the agent sends, kept until the server's Ack names it (contract section 5, rule 1).

Status reports live in the state file, the latest check-in in memory, telemetry windows in the
SQLite spool, application feedback reports in a spool of their own (``feedback.sqlite``).
:meth:`Outbox.flush` (re-)sends what is unacknowledged through the agent's
:class:`~device_agent.transport.base.Transport` (:attr:`Outbox.transport`, None while offline),
skipping messages sent too recently: a message is re-sent after ``report_retry_seconds``, then after
twice that and so on, up to ``report_retry_max_seconds``, each interval jittered by +-20%
(:func:`next_send`). Without the back-off a server that fell behind was buried by its fleet's re-sends (measured at 1,000 devices:
~30 sends of each status report). Spooled windows drain oldest first in batches so the backlog never
starves live windows, which are published as soon as they close.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any

from device_agent.settings import AgentSettings
from device_agent.store import AgentState, StateStore
from device_agent.telemetry.spool import Spool
from device_agent.transport.base import Transport
from device_agent.update.machine import Report, Step
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import (
    MAX_MESSAGE_BYTES,
    Assignment,
    CheckIn,
    FeedbackItem,
    FeedbackReport,
    RunningModel,
    StatusReport,
    TelemetryWindow,
)
from edgeota_contract.states import DeploymentState, ReasonCode
from edgeota_contract.topics import Channel
from edgeota_contract.version import __version__

if TYPE_CHECKING:
    from device_agent.telemetry.windows import WindowSummary
    from edgeota_contract.telemetry import ShadowSummary

log = logging.getLogger("device_agent.outbox")

_REPORTED_STEP = {
    Step.VERIFY_ASSIGNMENT: DeploymentState.DOWNLOADING,
    Step.CHECK_DISK: DeploymentState.DOWNLOADING,
    Step.DOWNLOAD: DeploymentState.DOWNLOADING,
    Step.CHECK_DIGEST: DeploymentState.VERIFYING,
    Step.VERIFY_BUNDLE: DeploymentState.VERIFYING,
    Step.SMOKE_TEST: DeploymentState.INSTALLING,
    Step.SWITCH: DeploymentState.INSTALLING,
    Step.TRIAL: DeploymentState.TRIAL,
    Step.COMMIT: DeploymentState.TRIAL,
}


def describe(
    state: AgentState, *, boot_id: str, seq: int, hardware_profile: str, shadow_version: str | None
) -> CheckIn:
    """The ``CheckIn`` for ``state``: what this device really runs and which deployment is open."""
    models = []
    info = state.active()
    dep = state.deployment
    if info is not None and state.active_slot is not None:
        models.append(
            RunningModel(
                model_name=info.model_name,
                version=info.version,
                bundle_sha256=info.bundle_sha256,
                release_counter=info.manifest.release_counter,
                slot=state.active_slot,
                state="trial" if dep is not None and dep.step == Step.TRIAL else "serving",
                shadow_version=shadow_version,
            )
        )
    return CheckIn(
        boot_id=boot_id,
        seq=seq,
        hardware_profile=hardware_profile,
        agent_version=__version__,
        models=models,
        active_deployment_id=dep.deployment_id if dep else None,
        active_state=_REPORTED_STEP.get(dep.step) if dep else None,
    )


def next_send(sends: int, now: float, first: float, cap: float, rng: random.Random | None = None) -> tuple[float, int]:
    """``(due, sends + 1)`` after the ``sends + 1``-th send at ``now``: ``first`` seconds, doubled for each
    earlier send, capped at ``cap``, jittered by +-20% so a fleet's re-sends do not line up."""
    interval = min(cap, first * 2.0 ** min(sends, 30))
    return now + interval * (rng or random).uniform(0.8, 1.2), sends + 1


class Outbox:
    """Sequence numbers, message building and (re-)sending for one agent. Thread-safe."""

    def __init__(
        self, boot_id: str, settings: AgentSettings, store: StateStore, spool: Spool, feedback: Spool | None = None
    ) -> None:
        self.boot_id = boot_id
        self.settings = settings
        self.store = store
        self.spool = spool
        self.feedback = feedback
        """Feedback reports waiting for their Ack (None: this agent sends no feedback)."""
        self.transport: Transport | None = None  # set by the agent while it is connected
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._sent_at: dict[str, tuple[float, int]] = {}  # msg_id -> (when a re-send is due, sends so far)
        self._checkin: tuple[str, bytes] | None = None

    def next_seq(self) -> int:
        with self._lock:
            return next(self._seq)

    def status(self, a: Assignment, report: Report) -> dict[str, Any]:
        """A ``StatusReport`` (as JSON data) for ``a`` moving to ``report.state``."""
        msg = StatusReport(
            boot_id=self.boot_id,
            seq=self.next_seq(),
            deployment_id=a.deployment_id,
            assignment_id=a.assignment_id,
            state=report.state,
            reason=report.reason,
            detail=report.detail[:1000],
            model_name=a.model_name,
            version=a.version,
            bundle_sha256=a.bundle_sha256,
        )
        return msg.model_dump(mode="json")

    def send_checkin(self, msg: CheckIn) -> None:
        """Send ``msg`` now; it replaces any earlier unacknowledged check-in."""
        with self._lock:
            self._checkin = (msg.msg_id, msg.model_dump_json().encode("utf-8"))
            pending = self._checkin
        self._publish(Channel.CHECKIN, *pending, force=True)

    def add_summary(self, window: WindowSummary, shadow: ShadowSummary | None) -> None:
        """Number a closed window (with the shadow's summary for it, if any) as a ``TelemetryWindow`` and
        :meth:`add_window` it."""
        msg = TelemetryWindow(
            boot_id=self.boot_id, seq=self.next_seq(), spool_dropped=self.spool.dropped, shadow=shadow, **vars(window)
        )
        self.add_window(msg)

    def add_window(self, msg: TelemetryWindow) -> None:
        """Spool a closed telemetry window, then try to send it at once.

        A window too large for one message (``MAX_MESSAGE_BYTES``; many features with fine bins) is
        sent without its per-feature histograms rather than not at all.
        """
        payload = msg.model_dump_json().encode("utf-8")
        if len(payload) > MAX_MESSAGE_BYTES:
            log_event(log, "telemetry_features_dropped", level=logging.WARNING, size=len(payload))
            payload = msg.model_copy(update={"features": []}).model_dump_json().encode("utf-8")
        self.spool.add(msg.msg_id, payload)
        self._publish(Channel.TELEMETRY, msg.msg_id, payload)

    def add_feedback(self, items: list[FeedbackItem]) -> FeedbackReport:
        """Spool ``items`` as one ``FeedbackReport`` (durable before this returns), then try to send it at once.

        Raises:
            EdgeotaError: this outbox has no feedback spool.
        """
        spool = self.feedback
        if spool is None:
            raise EdgeotaError("this agent keeps no feedback spool", ReasonCode.INTERNAL_ERROR)
        msg = FeedbackReport(boot_id=self.boot_id, seq=self.next_seq(), items=items, spool_dropped=spool.dropped)
        payload = msg.model_dump_json().encode("utf-8")
        spool.add(msg.msg_id, payload)
        self._publish(Channel.FEEDBACK, msg.msg_id, payload)
        return msg

    def _publish(self, channel: Channel, msg_id: str, payload: bytes, force: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        now = time.monotonic()
        with self._lock:
            sent = self._sent_at.get(msg_id)
        if not force and sent is not None and now < sent[0]:
            return
        if transport.send(channel, payload):
            s = self.settings
            sends = 0 if sent is None else sent[1]
            with self._lock:
                self._sent_at[msg_id] = next_send(sends, now, s.report_retry_seconds, s.report_retry_max_seconds)

    def flush(self, force: bool = False) -> None:
        """(Re-)send unacknowledged status reports, the pending check-in and a batch of spooled telemetry."""
        transport = self.transport
        if transport is None or not transport.connected:
            return
        for report in self.store.state.outbox:
            self._publish(Channel.STATUS, report["msg_id"], json.dumps(report).encode("utf-8"), force)
        with self._lock:
            pending = self._checkin
            now = time.monotonic()
            recent = {m for m, (due, _) in self._sent_at.items() if now < due}
        if pending is not None:
            self._publish(Channel.CHECKIN, *pending, force=force)
        for msg_id, payload in self.spool.oldest(self.settings.spool_drain_batch, skip=() if force else recent):
            self._publish(Channel.TELEMETRY, msg_id, payload, force)
        if self.feedback is not None:
            for msg_id, payload in self.feedback.oldest(self.settings.spool_drain_batch, skip=() if force else recent):
                self._publish(Channel.FEEDBACK, msg_id, payload, force)

    def acked(self, msg_ids: list[str]) -> None:
        """The server stored these messages: forget them everywhere."""
        ids = set(msg_ids)
        if any(r["msg_id"] in ids for r in self.store.state.outbox):
            with self.store.update() as st:
                st.outbox = [r for r in st.outbox if r["msg_id"] not in ids]
        with self._lock:
            if self._checkin is not None and self._checkin[0] in ids:
                self._checkin = None
            for msg_id in ids:
                self._sent_at.pop(msg_id, None)
        self.spool.ack(ids)
        if self.feedback is not None:
            self.feedback.ack(ids)

    def reconnected(self) -> None:
        """After a (re)connect everything unacknowledged is due again."""
        with self._lock:
            self._sent_at.clear()
