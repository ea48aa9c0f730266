"""The device agent: one instance per state folder, many instances per process if you like.

:class:`Agent` is the composition root: the state store and its lock, the update executor, the
serving runtime, telemetry and its spool, and the MQTT link. It owns no global state and installs no
signal handlers (that is the CLI's job). The logic lives elsewhere: commands in
:mod:`device_agent.commands`, the background threads in :mod:`device_agent.loop`, the update path in
:mod:`device_agent.update` (state machine, checks, executor, trial), start-up repair in
:mod:`device_agent.repair`, delivery in :mod:`device_agent.outbox`.

Typical use on a device::

    agent = Agent(AgentConfig.load("agent.toml"))
    agent.start()
    outputs = agent.predict({"x": batch})
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

from device_agent._lazy import lazy_module
from device_agent.commands import CommandHandler
from device_agent.fsutil import FreeSpaceProbe, disk_free
from device_agent.lock import StateDirLock
from device_agent.loop import Ticker, Timer, UpdateWorker
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
from device_agent.update.download import resolve_url
from device_agent.update.executor import CrashHook, Executor
from device_agent.update.machine import Step
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment, CheckIn, TelemetryWindow, new_id
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    import numpy as np

    from device_agent.mqtt_loop import SharedNetworkLoop
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent")


class Agent:
    """A running device agent. Public API: :meth:`start`, :meth:`stop`, :meth:`predict`,
    :meth:`handle_command`, :meth:`wait_idle`, :meth:`checkin`.

    Guarantees: at most one :class:`Agent` runs per state folder (a second :meth:`start` raises
    :class:`~device_agent.lock.AgentLockedError`); only a model that passed bundle verification and
    its smoke test is ever served; status reports, check-ins and telemetry windows are re-sent
    until the server acknowledges them. Threads: one timer thread, plus an update thread only while
    an update runs (:mod:`device_agent.loop`), plus the MQTT client's.
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
        mqtt_network_loop: SharedNetworkLoop | None = None,
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
            mqtt_network_loop: a network loop shared by many agents' MQTT clients (the fleet simulator),
                instead of one paho thread per agent.
        """
        self.config = config
        self.settings = config.settings
        self.device_id = config.device_id
        self.boot_id = new_id()
        self.cache = session_cache or SessionCache()
        self.runtime = ModelRuntime()
        self.telemetry = TelemetryRecorder(
            background=self.settings.telemetry_background,
            feature_sample_rate=self.settings.telemetry_feature_sample_rate,
            native=None if self.settings.telemetry_native else False,
        )
        self.runtime.add_listener(self.telemetry.record)
        self.sampler = InputSampler(
            self.settings.state_dir / "samples", self.settings.sample_rate, self.settings.sample_max_files
        )
        if self.settings.sample_rate > 0:
            self.runtime.add_listener(self.sampler)
        self._connect = connect
        self._free_space = free_space
        self._crash_hook = crash_hook
        self._defer_update = defer_update
        self._network_loop = mqtt_network_loop
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._lock = StateDirLock(self.settings.state_dir)
        self._store: StateStore | None = None
        self._executor: Executor | None = None
        self._outbox: Outbox | None = None
        self._commands: CommandHandler | None = None
        self._ticker: Ticker | None = None
        self._worker: UpdateWorker | None = None
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
            self._repair()
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
            self.link = MqttLink(
                self.device_id,
                self.boot_id,
                self.config.provisioning.mqtt,
                self.handle_command,
                self._on_connected,
                network_loop=self._network_loop,
            )
            self.link.connect_probe_seconds = s.mqtt_connect_probe_seconds
            self.outbox.link = self.link
            self.link.start()
        self._wake_worker()  # resume an interrupted update, send what is queued

    def stop(self, timeout: float = 10.0) -> None:
        """Stop threads (an update in progress resumes at its step on the next start), close telemetry
        windows into the spool, say offline, release the lock. Idempotent."""
        if not self._lock.held:
            return
        self._stop.set()
        workers = [w for w in (self._ticker, self._worker) if w is not None]
        for w in workers:
            w.join(timeout)
        died = self._worker is not None and self._worker.died
        if not died and not any(w.alive() for w in workers):
            self._give_back_boot_attempt()
        self._ticker = self._worker = None
        self._roll_telemetry()
        self.telemetry.close()  # after the roll drained it: releases the shared summariser thread
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

    # ------------------------------------------------------------------ inference and commands

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the serving model on ``inputs`` (name -> array). Never sees a half-swapped model.

        Raises:
            NoModelError: no model installed yet.
            ModelError: bad inputs or an inference failure.
        """
        return self.runtime.predict(inputs)

    def handle_command(self, payload: bytes) -> None:
        """Act on one signed command (from MQTT or a file). Never raises for a bad command: it is
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
            self._outbox.add_window(
                TelemetryWindow(
                    boot_id=self.boot_id,
                    seq=self.next_seq(),
                    spool_dropped=self._outbox.spool.dropped,
                    shadow=attach,
                    **vars(window),
                )
            )

    def _heartbeat(self) -> None:
        if self.link is not None and self.link.connected:
            self.send_checkin()

    def _retry(self) -> None:
        self.flush()
        self._upload_samples()

    def _upload_samples(self) -> None:
        if self.settings.sample_rate <= 0:
            return
        self.sampler.persist()
        target = self.settings.sample_upload_path
        if target is None:
            return
        url, same_origin = resolve_url(self.config.provisioning.server.url, target.format(device_id=self.device_id))
        self.sampler.upload(url, self.config.provisioning.server.token if same_origin else None)

    # ------------------------------------------------------------------ introspection

    @property
    def state(self) -> AgentState:
        """The persisted state (a shared read-only snapshot)."""
        return self.store.state

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir
