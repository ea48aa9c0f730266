"""The device agent: one instance per state folder, many instances per process if you like.

:class:`Agent` ties the pieces together: the state store and its lock, the update executor
(one worker thread), the serving runtime, telemetry and its spool, and the MQTT link. It owns no
global state and installs no signal handlers (that is the CLI's job). It is the composition root,
hence longer than the other modules; the logic lives in :mod:`device_agent.update` (state machine,
checks, executor, trial), :mod:`device_agent.repair`, :mod:`device_agent.outbox` and friends.

Typical use on a device::

    agent = Agent(AgentConfig.load("agent.toml"))
    agent.start()
    outputs = agent.predict({"x": batch})
    ...
    agent.stop()
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent._lazy import lazy_module
from device_agent.fsutil import FreeSpaceProbe, disk_free
from device_agent.lock import StateDirLock
from device_agent.mqtt_link import MqttLink
from device_agent.outbox import Outbox, describe
from device_agent.repair import repair
from device_agent.runtime import LoadedModel, ModelError, ModelRuntime, SessionCache
from device_agent.sampling import InputSampler
from device_agent.settings import AgentConfig
from device_agent.shadow import ShadowRunner
from device_agent.spool import Spool
from device_agent.store import SHADOW_SLOT, AgentState, StateStore
from device_agent.telemetry import TelemetryRecorder
from device_agent.update import machine
from device_agent.update.checks import Verdict, decide
from device_agent.update.download import resolve_url
from device_agent.update.executor import CrashHook, Executor, Interrupted
from device_agent.update.machine import Report, Step
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import (
    Ack,
    Assignment,
    CheckIn,
    CheckinRequest,
    ShadowStop,
    SignedCommand,
    TelemetryWindow,
    new_id,
    verify_command,
)
from edgeota_contract.states import DeploymentState, ReasonCode

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent")


class Agent:
    """A running device agent. Public API: :meth:`start`, :meth:`stop`, :meth:`predict`,
    :meth:`handle_command`, :meth:`wait_idle`, :meth:`checkin`.

    Guarantees: at most one :class:`Agent` runs per state folder (a second :meth:`start` raises
    :class:`~device_agent.lock.AgentLockedError`); only a model that passed bundle verification and
    its smoke test is ever served; status reports, check-ins and telemetry windows are re-sent
    until the server acknowledges them.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        session_cache: SessionCache | None = None,
        free_space: FreeSpaceProbe = disk_free,
        crash_hook: CrashHook | None = None,
        connect: bool = True,
        defer_update: Callable[[Assignment], bool] | None = None,
    ) -> None:
        """Create (not start) an agent.

        Args:
            config: identity, trust roots and settings (:meth:`AgentConfig.load`).
            session_cache: ONNX Runtime sessions to share with other agents in this process.
            free_space: free-bytes probe for the disk check (tests fake a full disk with it).
            crash_hook: called with each step's name before it runs (default: SIGKILL at ``crash_at``).
            connect: False runs without MQTT (reports stay queued in the state folder).
            defer_update: asked before a model switch; returning True defers it (the application is busy),
                for at most ``max_update_deferral_seconds`` in total.
        """
        self.config = config
        self.settings = config.settings
        self.device_id = config.device_id
        self.boot_id = new_id()
        self.cache = session_cache or SessionCache()
        self.runtime = ModelRuntime()
        self.telemetry = TelemetryRecorder()
        self.runtime.add_listener(self.telemetry)
        self.sampler = InputSampler(
            self.settings.state_dir / "samples", self.settings.sample_rate, self.settings.sample_max_files
        )
        if self.settings.sample_rate > 0:
            self.runtime.add_listener(self.sampler)
        self.rejected_commands = 0
        self._connect = connect
        self._free_space = free_space
        self._crash_hook = crash_hook
        self._defer_update = defer_update
        self._worker_died = False
        self._command_lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._lock = StateDirLock(self.settings.state_dir)
        self._threads: list[threading.Thread] = []
        self._store: StateStore | None = None
        self._executor: Executor | None = None
        self._outbox: Outbox | None = None
        self.link: MqttLink | None = None
        self.shadow: ShadowRunner | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise EdgeotaError("agent is not started", ReasonCode.INTERNAL_ERROR)
        return self._outbox

    @property
    def store(self) -> StateStore:
        if self._store is None:
            raise EdgeotaError("agent is not started", ReasonCode.INTERNAL_ERROR)
        return self._store

    def start(self) -> None:
        """Lock the state folder, repair any interrupted update, serve the active model, connect.

        Raises:
            AgentLockedError: another agent holds this state folder.
            StateError: the state file is unreadable.
        """
        self._lock.acquire()
        try:
            self._store = StateStore(self.settings.state_dir)
            spool = Spool(self.settings.state_dir / "telemetry.sqlite", self.settings.spool_max_windows)
            self._outbox = Outbox(self.boot_id, self.settings, self._store, spool)
            self._executor = Executor(
                self.config,
                self._store,
                self.runtime,
                self.cache,
                self._outbox.status,
                crash_hook=self._crash_hook,
                free_space=self._free_space,
                stop=self._stop,
                defer_update=self._defer_update,
            )
            self._executor.on_shadow = self._set_shadow
            self._repair()
        except BaseException:
            self._lock.release()
            raise
        log_event(log, "agent_started", device=self.device_id, boot_id=self.boot_id)
        self._spawn(self._worker, "update")
        self._spawn(self._ticker, "ticker")
        if self._connect:
            self.link = MqttLink(
                self.device_id, self.boot_id, self.config.provisioning.mqtt, self.handle_command, self._on_connected
            )
            self.link.connect_probe_seconds = self.settings.mqtt_connect_probe_seconds
            self.outbox.link = self.link
            self.link.start()
        self._wake.set()

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"agent-{self.device_id}-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop threads (an update in progress resumes at its step on the next start), close telemetry
        windows into the spool, say offline, release the lock. Idempotent."""
        if not self._lock.held:
            return
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout)
        if not self._worker_died and not any(t.is_alive() for t in self._threads):
            self._give_back_boot_attempt()
        self._threads.clear()
        self._roll_telemetry()
        if self.shadow is not None:
            self.shadow.stop()
        if self.link is not None:
            self.link.stop()
            self.link = None
            self.outbox.link = None
        self.outbox.spool.close()
        self._lock.release()
        log_event(log, "agent_stopped", device=self.device_id)

    def _give_back_boot_attempt(self) -> None:
        """A clean shutdown during a trial is not a crash: the next start must not count it as one."""
        dep = self.store.state.deployment
        if dep is not None and dep.step == Step.TRIAL and dep.boot_attempts > 0:
            with self.store.update() as st:
                st.deployment = dep.model_copy(update={"boot_attempts": dep.boot_attempts - 1})

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ start-up repair

    def _repair(self) -> None:
        """Resolve whatever the last process left half done, then serve the active model (and shadow)."""
        assert self._executor is not None
        state = repair(self.store, self._executor, self.settings.max_boot_attempts)
        if state.active_slot is not None:
            try:
                self.runtime.install(self._executor.load_slot(state.active_slot))
            except ModelError as exc:
                log_event(log, "active_model_load_failed", level=logging.ERROR, detail=str(exc))
        if state.shadow_deployment is not None and state.slots.get(SHADOW_SLOT) is not None:
            try:
                self._set_shadow(self._executor.load_slot(SHADOW_SLOT), state.shadow_sample_rate)
            except ModelError as exc:
                log_event(log, "shadow_model_load_failed", level=logging.ERROR, detail=str(exc))

    def _set_shadow(self, candidate: LoadedModel | None, sample_rate: float) -> None:
        """Start shadowing ``candidate`` (replacing any earlier one), or stop with None."""
        old, self.shadow = self.shadow, None
        if old is not None:
            self.runtime.remove_listener(old)
            old.stop()
        if candidate is not None:
            self.shadow = ShadowRunner(candidate, sample_rate)
            self.runtime.add_listener(self.shadow)
            log_event(log, "shadow_started", version=candidate.manifest.version, sample_rate=sample_rate)

    # ------------------------------------------------------------------ worker

    def _worker(self) -> None:
        try:
            self._work()
        except BaseException:
            self._worker_died = True  # not a clean shutdown: a trial in progress keeps its boot attempt
            raise

    def _work(self) -> None:
        assert self._executor is not None
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._executor.run_pending()
                pending = self.store.state.pending_command
                if pending is not None:
                    with self.store.update() as st:
                        st.pending_command = None
                    self.handle_command(pending.encode("utf-8"))
                    continue
            except Interrupted:
                return
            except Exception:
                log.exception("update worker error")
                self._stop.wait(1.0)
            self.flush()
            if self.store.state.deployment is None and self.store.state.pending_command is None:
                self._idle.set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no deployment is in progress or queued; True if that happened in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.store.state
            if state.deployment is None and state.pending_command is None:
                return True
            self._idle.clear()
            self._idle.wait(min(0.2, max(0.0, deadline - time.monotonic())))
        return False

    # ------------------------------------------------------------------ inference

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the serving model on ``inputs`` (name -> array). Never sees a half-swapped model.

        Raises:
            NoModelError: no model installed yet.
            ModelError: bad inputs or an inference failure.
        """
        return self.runtime.predict(inputs)

    # ------------------------------------------------------------------ commands

    def handle_command(self, payload: bytes) -> None:
        """Act on one signed command (from MQTT or a file). Never raises for a bad command: it is
        ignored, counted in :attr:`rejected_commands`, logged, and reported when it names a deployment."""
        with self._command_lock:  # MQTT's thread and the update worker (queued assignments) both call this
            self._handle_command(payload)

    def _handle_command(self, payload: bytes) -> None:
        try:
            command = verify_command(payload, self.config.server_keys, self.device_id)
        except EdgeotaError as exc:
            self.rejected_commands += 1
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
            self.send_checkin()
        elif isinstance(command, ShadowStop):
            self._shadow_stop(command)
        else:
            self._assignment(command, payload)

    def _shadow_stop(self, command: ShadowStop) -> None:
        assert self._executor is not None
        state = self.store.state
        if command.nonce in state.used_nonces:
            return
        shadow = state.slots.get(SHADOW_SLOT)
        if shadow is not None and shadow.model_name == command.model_name:
            self._executor.stop_shadow()
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
            st.add_report(self.outbox.status(assignment, report), self.settings.outbox_max_reports)
        self.flush()

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
            self._wake.set()
        elif decision.verdict == Verdict.REREPORT:
            final = state.finished_by_id(a.deployment_id)
            assert final is not None
            self._report_now(a, Report(final.state, final.reason, final.detail))
        elif decision.verdict == Verdict.QUEUE:
            with self.store.update() as st:
                st.pending_command = payload.decode("utf-8")
        elif decision.verdict == Verdict.START:
            with self.store.update() as st:
                st.remember_nonce(a.nonce)
                target = SHADOW_SLOT if a.mode == "shadow" else st.inactive_slot()
                st.deployment = machine.start(a, target, st.active_slot)
            self._idle.clear()
            self._wake.set()
        elif decision.verdict == Verdict.ALREADY_INSTALLED:
            self._finish_without_update(a, DeploymentState.COMMITTED, ReasonCode.OK, decision.detail)
        elif decision.reason == ReasonCode.ASSIGNMENT_REPLAYED:
            self._report_now(a, Report(DeploymentState.FAILED, decision.reason, decision.detail))
        else:
            self._finish_without_update(a, DeploymentState.FAILED, decision.reason, decision.detail)

    def _finish_without_update(self, a: Assignment, outcome: DeploymentState, reason: ReasonCode, detail: str) -> None:
        assert self._executor is not None
        dep = machine.Deployment(
            assignment=a, step=Step.DONE, target_slot="-", outcome=outcome, reason=reason, detail=detail
        )
        with self.store.update() as st:
            st.remember_nonce(a.nonce)
        self._executor.commit_transition(machine.Transition(dep, (Report(outcome, reason, detail),)))
        self.flush()

    # ------------------------------------------------------------------ reports

    def next_seq(self) -> int:
        return self.outbox.next_seq()

    def checkin(self) -> CheckIn:
        """What this device really runs, as a ``CheckIn`` (not yet sent)."""
        return describe(
            self.store.state,
            boot_id=self.boot_id,
            seq=self.next_seq(),
            hardware_profile=self.config.hardware_profile,
            shadow_version=self.shadow.version if self.shadow is not None else None,
        )

    def send_checkin(self) -> None:
        """Send a fresh ``CheckIn``; it replaces any earlier unacknowledged one."""
        self.outbox.send_checkin(self.checkin())

    def flush(self, force: bool = False) -> None:
        """(Re-)send everything unacknowledged that was not sent in the last ``report_retry_seconds``."""
        if self._outbox is not None:
            self._outbox.flush(force)

    def _on_connected(self) -> None:
        self.outbox.reconnected()
        self.send_checkin()
        self.flush(force=True)

    # ------------------------------------------------------------------ telemetry and heartbeat

    def _roll_telemetry(self) -> None:
        if self._outbox is None:
            return
        windows = self.telemetry.roll()
        shadow = self.shadow.take_summary() if self.shadow is not None else None
        serving = self.runtime.current
        for window in windows:
            attach = shadow if serving is not None and window.bundle_sha256 == serving.bundle_sha256 else None
            self._outbox.add_window(
                TelemetryWindow(
                    boot_id=self.boot_id,
                    seq=self.next_seq(),
                    spool_dropped=self._outbox.spool.dropped,
                    shadow=attach,
                    **vars(window),
                )
            )

    def _upload_samples(self) -> None:
        if self.settings.sample_rate <= 0:
            return
        self.sampler.persist()
        target = self.settings.sample_upload_path
        if target is None:
            return
        url, same_origin = resolve_url(self.config.provisioning.server.url, target.format(device_id=self.device_id))
        self.sampler.upload(url, self.config.provisioning.server.token if same_origin else None)

    def _ticker(self) -> None:
        s = self.settings
        next_beat = time.monotonic() + s.heartbeat_seconds
        next_window = time.monotonic() + s.telemetry_window_seconds
        next_retry = time.monotonic() + s.report_retry_seconds
        while not self._stop.wait(min(0.5, s.telemetry_window_seconds, s.report_retry_seconds)):
            now = time.monotonic()
            try:
                if now >= next_window:
                    next_window = now + s.telemetry_window_seconds
                    self._roll_telemetry()
                if now >= next_beat:
                    next_beat = now + s.heartbeat_seconds
                    if self.link is not None and self.link.connected:
                        self.send_checkin()
                if now >= next_retry:
                    next_retry = now + s.report_retry_seconds
                    self.flush()
                    self._upload_samples()
            except Exception:
                log.exception("agent ticker error")

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> AgentState:
        return self.store.state

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir
