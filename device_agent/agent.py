"""The device agent: one instance per state folder, many instances per process if you like.

:class:`Agent` is the composition root: the state store and its lock, the update executor, the
serving runtime, telemetry and its spool, and the transport. It owns no global state and installs no
signal handlers (that is the CLI's job). The logic lives in the packages: :mod:`device_agent.update`
(signed commands, state machine, checks, download, executor, trial, start-up repair),
:mod:`device_agent.transport` (the :class:`~device_agent.transport.base.Transport` seam, MQTT, HTTP
polling, the HTTP client, the outbox), :mod:`device_agent.serving` (runtime, shadow) and
:mod:`device_agent.telemetry` (windows, spool, raw-input samples); the background threads are in
:mod:`device_agent.loop`, and the parts built from settings or put back in service at start-up (telemetry
recorder and input sampler, the models repaired and served again, the inference endpoint) in :mod:`device_agent.wiring`;
the serving calls (predict, feedback, the shadow switch) in :mod:`device_agent.agent_serving` (mixed in).

Typical use on a device::

    agent = Agent(AgentConfig.load("agent.toml"))
    agent.start()
    outputs = agent.predict({"x": batch})
    outputs, prediction = agent.predict_tracked({"x": batch})   # remembered for feedback
    agent.feedback(prediction.prediction_id, label=3)           # the true class, sent to the server
    ...
    agent.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.agent_serving import ServingMixin
from device_agent.fsutil import FreeSpaceProbe, disk_free
from device_agent.health import ConnectionHealth, ServerCheck
from device_agent.lock import StateDirLock
from device_agent.loop import Ticker, Timer, UpdateWorker
from device_agent.serving.predictions import PredictionMemory
from device_agent.serving.runtime import ModelRuntime, SessionCache
from device_agent.serving.shadow import ShadowRunner
from device_agent.settings import AgentConfig
from device_agent.store import AgentState, StateStore
from device_agent.telemetry.spool import Spool
from device_agent.transport.base import Transport, TransportFactory
from device_agent.transport.factory import build_transport
from device_agent.transport.outbox import Outbox, describe
from device_agent.transport.status import ObservableTransport
from device_agent.update.commands import CommandHandler
from device_agent.update.executor import CrashHook, Executor
from device_agent.update.repair import give_back_boot_attempt
from device_agent.wiring import build_recorder, build_sampler, open_endpoint, restore_models
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment, CheckIn, new_id
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    from device_agent.serving.http_endpoint import InferenceEndpoint

log = logging.getLogger("device_agent")


class Agent(ServingMixin):
    """A running device agent. Public API: :meth:`start`, :meth:`stop`, :meth:`predict`,
    :meth:`handle_command`, :meth:`wait_idle`, :meth:`checkin`.

    Guarantees: at most one :class:`Agent` runs per state folder (a second :meth:`start` raises
    :class:`~device_agent.lock.AgentLockedError`); only a model that passed bundle verification and
    its smoke test is ever served; status reports, check-ins and telemetry windows are re-sent
    until the server acknowledges them. Threads: one timer thread, plus an update thread only while
    an update runs (:mod:`device_agent.loop`), plus the transport's (paho's, and a poller's with
    ``command_transport = "http_poll"``).
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
        transport: TransportFactory | None = None,
        serve: bool = False,
    ) -> None:
        """Create (not start) an agent.

        Args:
            config: identity, trust roots and settings (:meth:`AgentConfig.load`).
            session_cache: ONNX Runtime sessions to share with other agents in this process.
            free_space: free-bytes probe for the disk check (tests fake a full disk with it).
            crash_hook: called with each step's name before it runs (default: SIGKILL at ``crash_at``).
            connect: False runs without a transport (reports stay queued in the state folder).
            defer_update: asked before a model switch; returning True defers it (the application is busy),
                for at most ``max_update_deferral_seconds`` in total.
            transport: builds the transport on each :meth:`start` from ``(config, boot_id)``; default
                :func:`~device_agent.transport.factory.build_transport` (``command_transport`` decides).
            serve: open the local inference endpoint on :meth:`start` when ``serve_enabled`` is set too
                (``edgeota agent run`` passes True; an application embedding the agent calls :meth:`predict`).
        """
        self.config = config
        self.settings = config.settings
        self.device_id = config.device_id
        self.boot_id = new_id()
        self.cache = session_cache or SessionCache()
        self.runtime = ModelRuntime()
        s = self.settings
        self.predictions = PredictionMemory(s.feedback_max_predictions, s.feedback_max_age_seconds)
        self.telemetry = build_recorder(self.settings)
        self.runtime.add_listener(self.telemetry.record)
        self.sampler = build_sampler(self.settings, lambda: self.shadow.candidate if self.shadow is not None else None)
        if self.sampler.enabled:
            self.runtime.add_listener(self.sampler)
        self._connect = connect
        self._free_space = free_space
        self._crash_hook = crash_hook
        self._defer_update = defer_update
        self._transport_factory: TransportFactory = transport or build_transport
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._lock = StateDirLock(self.settings.state_dir)
        self._store: StateStore | None = None
        self._executor: Executor | None = None
        self._outbox: Outbox | None = None
        self._commands: CommandHandler | None = None
        self._ticker: Ticker | None = None
        self._worker: UpdateWorker | None = None
        self.transport: Transport | None = None  # while started and connecting
        self.health: ConnectionHealth | None = None
        """Broker and server reachability while started with a transport (``<state_dir>/connection.json``)."""
        self._server_check: ServerCheck | None = None
        self.shadow: ShadowRunner | None = None
        self._serve = serve
        self.endpoint: InferenceEndpoint | None = None
        """The Open Inference Protocol endpoint while started with ``serve`` (:mod:`device_agent.serving`)."""

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

    @property
    def rejected_commands(self) -> int:
        """Commands ignored because their signature, device or freshness did not verify."""
        return self._commands.rejected if self._commands is not None else 0

    def start(self) -> None:
        """Lock the state folder, repair any interrupted update, serve the active model, connect.

        Raises:
            AgentLockedError: another agent holds this state folder.
            StateError: the state file is unreadable.
        """
        self._lock.acquire()
        try:
            self._stop.clear()
            self._store = StateStore(self.settings.state_dir)
            spool = Spool(self.settings.state_dir / "telemetry.sqlite", self.settings.spool_max_windows)
            feedback = Spool(self.settings.state_dir / "feedback.sqlite", self.settings.feedback_spool_max_reports)
            self._outbox = Outbox(self.boot_id, self.settings, self._store, spool, feedback)
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
            self._executor.on_reports = self.flush
            self._commands = CommandHandler(
                self.config,
                self._store,
                self._outbox,
                self._executor,
                wake_worker=self._wake_worker,
                send_checkin=self.send_checkin,
                flush=self.flush,
            )
            # Resolve whatever the last process left half done, then serve the active model (and shadow).
            restore_models(self._store, self._executor, self.runtime, self.settings.max_boot_attempts, self._set_shadow)
        except BaseException:
            self._lock.release()
            raise
        log_event(
            log,
            "agent_started",
            device=self.device_id,
            boot_id=self.boot_id,
            telemetry_path="c" if self.telemetry.native else "python",
        )
        s = self.settings
        name = f"agent-{self.device_id}"
        self._worker = UpdateWorker(f"{name}-update", self._stop, self._update_pass)
        self._ticker = Ticker(
            f"{name}-ticker",
            self._stop,
            [
                Timer("telemetry", s.telemetry_window_seconds, self._roll_telemetry),
                Timer("heartbeat", s.heartbeat_seconds, self._heartbeat),
                Timer("retry", s.report_retry_seconds, self._retry),
            ],
        )
        self._ticker.start()
        if self._connect:
            self.health = ConnectionHealth(s.state_dir, self.device_id)
            self.transport = self._transport_factory(self.config, self.boot_id)
            if isinstance(self.transport, ObservableTransport):
                self.transport.observe(self.health.broker)
            self.outbox.transport = self.transport
            self.transport.start(self.handle_command, self._on_connected)
            if s.server_check_seconds > 0:
                server = self.config.provisioning.server
                self._server_check = ServerCheck(
                    server.url, s.server_check_seconds, self.health, allow_insecure_http=s.allow_insecure_http
                )
                self._server_check.start()
        self._wake_worker()  # resume an interrupted update, send what is queued
        if self._serve and s.serve_enabled:
            try:
                self.endpoint = open_endpoint(self.settings, self.runtime, self._remember, self._endpoint_feedback)
            except BaseException:
                self.stop()
                raise

    def stop(self, timeout: float = 10.0, *, abrupt: bool = False) -> None:
        """Stop threads (an update in progress resumes at its step on the next start), close telemetry
        windows into the spool, say offline, release the lock. Idempotent.

        ``abrupt``: drop the transport first, without a goodbye, as a killed process would (MQTT: the broker
        publishes the last will); the rest of the stop is the same.
        """
        if not self._lock.held:
            return
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.stop()
        transport, self.transport = self.transport, None
        check, self._server_check = self._server_check, None
        if check is not None:
            check.stop()
        if abrupt and transport is not None:
            self.outbox.transport = None
            transport.abort()
            transport = None
        self._stop.set()
        workers = [w for w in (self._ticker, self._worker) if w is not None]
        for w in workers:
            w.join(timeout)
        died = self._worker is not None and self._worker.died
        if not died and not any(w.alive() for w in workers):
            give_back_boot_attempt(self.store)
        self._ticker = self._worker = None
        self._roll_telemetry()
        self.telemetry.close()  # after the roll drained it: releases the shared summariser thread
        if self.shadow is not None:
            self.shadow.stop()
        if transport is not None:
            transport.stop()
            self.outbox.transport = None
        self.outbox.spool.close()
        health, self.health = self.health, None
        if health is not None:
            health.close()
        if self.outbox.feedback is not None:
            self.outbox.feedback.close()
        self._lock.release()
        log_event(log, "agent_stopped", device=self.device_id)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ update worker

    def _wake_worker(self) -> None:
        self._idle.clear()
        if self._worker is not None:
            self._worker.wake()

    def _update_pass(self) -> bool:
        """One pass of the update worker: run the deployment in progress, then a queued assignment.
        Returns True when a queued assignment was taken (so the worker runs again at once)."""
        assert self._executor is not None
        self._executor.run_pending()
        pending = self.store.state.pending_command
        if pending is not None:
            with self.store.update() as st:
                st.pending_command = None
            self.handle_command(pending.encode("utf-8"))
            return True
        self.flush()
        state = self.store.state
        if state.deployment is None and state.pending_command is None:
            self._idle.set()
        return False

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

    # ------------------------------------------------------------------ commands

    def handle_command(self, payload: bytes) -> None:
        """Act on one signed command (from the transport or a file). Never raises for a bad command: it is
        ignored, counted in :attr:`rejected_commands`, logged, and reported when it names a deployment.

        Raises:
            EdgeotaError: the agent is not started.
        """
        if self._commands is None:
            raise EdgeotaError("agent is not started", ReasonCode.INTERNAL_ERROR)
        if not self._lock.held:  # stopped (or killed in the simulator): a late delivery is not ours to act on
            log_event(log, "command_after_stop", level=logging.DEBUG, device=self.device_id)
            return
        self._commands.handle(payload)

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

    # ------------------------------------------------------------------ timers: telemetry, heartbeat, retries

    def _roll_telemetry(self) -> None:
        if self._outbox is None:
            return
        windows = self.telemetry.roll()
        shadow = self.shadow.take_summary() if self.shadow is not None else None
        serving = self.runtime.current
        for window in windows:
            attach = shadow if serving is not None and window.bundle_sha256 == serving.bundle_sha256 else None
            self._outbox.add_summary(window, attach)

    def _heartbeat(self) -> None:
        transport = self.transport
        if transport is not None and transport.connected:
            self.send_checkin()

    def _retry(self) -> None:
        self.flush()
        if self.sampler.enabled:
            server = self.config.provisioning.server
            self.sampler.persist_and_upload(
                server.url,
                server.token,
                self.settings.sample_upload_path,
                self.device_id,
                allow_insecure_http=self.settings.allow_insecure_http,
            )

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> AgentState:
        """The persisted state (a shared read-only snapshot)."""
        return self.store.state

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir
