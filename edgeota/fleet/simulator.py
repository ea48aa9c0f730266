"""Many real device agents in one process: identities, folders, synthetic load and injected faults.

:class:`FleetSimulator` provisions ``devices`` devices through the OTA server, writes one folder per
device, starts one real agent per device (:mod:`edgeota.fleet.agents` adapts the device agent's
class; ONNX Runtime sessions are shared per bundle through one session cache), drives inference at
``rate_per_device`` requests per second through each agent's predict API, and plays the fault
timeline (:mod:`edgeota.fleet.faults`). Agents get their transports through the agent's constructor
(:func:`edgeota.fleet.agents.fleet_transport`). By default every agent's MQTT connection runs on one
:class:`~edgeota.fleet.mqtt_loop.SharedNetworkLoop` (one epoll thread plus a few dispatch workers per
process, one file descriptor per connection) instead of a paho thread each, which could not serve
file descriptors above 1023. With ``poll_seconds`` set, devices run with the agent's
``command_transport = "http_poll"`` and take their assignments only from HTTP polls, all made by one
:class:`~edgeota.fleet.poll.SharedCommandPoller` per process: the pull-based baseline. ``stop()`` (or leaving the ``with``
block) stops the load, the poller, the agents, the network loop and the proxies, in that order.

Errors: ``ProvisioningError`` from :meth:`FleetSimulator.provision`; ``FaultSpecError`` when a fault
names an unknown device; :class:`FleetConfigError` for an unknown input source.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from edgeota.fleet.agents import SimAgent, build_agent, fleet_transport, new_session_cache
from edgeota.fleet.config import (
    FAST_AGENT_SETTINGS,
    SWITCH_INTERVAL_MAX_DEVICES,
    SWITCH_INTERVAL_SECONDS,
    FleetConfig,
    FleetConfigError,
    FleetSnapshot,
    SimDevice,
)
from edgeota.fleet.faults import Fault, FaultKind, FaultSpecError, assign_faults
from edgeota.fleet.load import INPUT_SOURCES, Drift, InputSampler
from edgeota.fleet.netcut import ProxyHub
from edgeota.fleet.poll import SharedCommandPoller
from edgeota.fleet.provision import plan_devices, provision_device, write_device_folder
from edgeota_contract.logs import log_event

__all__ = ["FAST_AGENT_SETTINGS", "FleetConfig", "FleetConfigError", "FleetSimulator", "FleetSnapshot", "SimDevice"]

log = logging.getLogger(__name__)


class FleetSimulator:
    """N real agents in this process. A context manager; see the module docstring."""

    def __init__(self, config: FleetConfig) -> None:
        """Check ``config`` (nothing starts until :meth:`provision` / :meth:`start`).

        Raises:
            FleetConfigError: an unknown ``input_source``.
        """
        if config.input_source not in INPUT_SOURCES:
            raise FleetConfigError(f"unknown input source {config.input_source!r}; choose from {INPUT_SOURCES}")
        self.config = config
        self.devices: list[SimDevice] = []
        self._hub: ProxyHub | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._session_cache: Any = None
        self._net: Any = None  # the SharedNetworkLoop
        self._poller: SharedCommandPoller | None = None
        self._transport: Any = None  # the agents' transport factory
        self._switch_interval: float | None = None
        self._lock = threading.Lock()
        self.started_at = 0.0
        self.events: list[tuple[float, str, str]] = []  # (seconds since start, device id, what happened)

    # ------------------------------------------------------------ setup

    def provision(self, progress: Any = None) -> list[SimDevice]:
        """Provision every device (idempotent per workdir) and write its folder.

        ``progress``: optional callable(done, total) for a progress bar.
        """
        import httpx

        cfg = self.config
        plans = plan_devices(cfg.devices, list(cfg.profiles), cfg.prefix, cfg.labels)
        per_device = assign_faults(cfg.faults, [p.device_id for p in plans], cfg.seed)
        headers = {"Authorization": f"Bearer {cfg.admin_token}"}
        settings = {**FAST_AGENT_SETTINGS, **cfg.agent_overrides}
        if cfg.poll_seconds is not None:
            settings |= {"command_transport": "http_poll", "command_poll_seconds": cfg.poll_seconds}
        with httpx.Client(base_url=cfg.server_url, headers=headers, timeout=30) as client:
            for index, plan in enumerate(plans):
                folder = cfg.workdir / plan.device_id
                provisioning = provision_device(client, plan, folder)
                faults = per_device.get(plan.device_id, [])
                proxy = None
                if any(f.kind == FaultKind.NETWORK_CUT for f in faults):
                    proxy = self._proxy_hub().proxy(provisioning.mqtt.host, provisioning.mqtt.port)
                address = ("127.0.0.1", proxy.listen_port) if proxy else None
                config_path = write_device_folder(folder, provisioning, settings, address)
                drift = next((Drift(f.num("shift"), f.num("scale")) for f in faults if f.kind == FaultKind.DRIFT), None)
                self.devices.append(SimDevice(plan, folder, config_path, faults, proxy, drift=drift))
                if progress is not None:
                    progress(index + 1, len(plans))
        return self.devices

    def _proxy_hub(self) -> ProxyHub:
        if self._hub is None:
            self._hub = ProxyHub()
        return self._hub

    # ------------------------------------------------------------ running

    def start(self) -> None:
        """Start every agent (except those whose ``offline`` fault starts at 0), the load and the fault timeline."""
        if not self.devices:
            self.provision()
        self._session_cache = new_session_cache()
        if len(self.devices) <= SWITCH_INTERVAL_MAX_DEVICES:
            self._switch_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch_interval, SWITCH_INTERVAL_SECONDS))
        if self.config.shared_mqtt_loop:
            from edgeota.fleet.mqtt_loop import SharedNetworkLoop

            self._net = SharedNetworkLoop(name="fleet-mqtt", workers=self.config.mqtt_loop_workers)
            self._net.start()
        if self.config.poll_seconds is not None:
            self._poller = SharedCommandPoller(
                self.config.poll_seconds, seed=self.config.seed, threads=self.config.poll_threads
            )
            self._poller.start()
        self._transport = fleet_transport(self._net, self._poller)
        self.started_at = time.monotonic()
        for device in self.devices:
            device.agent = self._new_agent(device)
            if not any(f.kind == FaultKind.OFFLINE and f.num("after") == 0 for f in device.faults):
                self._start_agent(device)
        for i in range(max(1, self.config.load_threads)):
            share = self.devices[i :: max(1, self.config.load_threads)]
            self._spawn(f"edgeota-load-{i}", self._load_loop, share)
        self._spawn("edgeota-faults", self._fault_loop)

    def _new_agent(self, device: SimDevice) -> SimAgent:
        agent = build_agent(device.config_path, self._session_cache, self._transport)
        for fault in device.faults:
            if fault.kind == FaultKind.KILL_MID_UPDATE and fault not in device.spent:
                agent.arm_crash(fault.text("step"))
        return agent

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_agent(self, device: SimDevice) -> None:
        assert device.agent is not None
        device.agent.start()
        device.running = True
        self._event(device, "agent started")

    def _stop_agent(self, device: SimDevice, abrupt: bool = False) -> None:
        if device.agent is not None and device.running:
            device.running = False
            if abrupt:
                device.agent.kill()
            else:
                device.agent.stop()
            self._event(device, "agent killed" if abrupt else "agent stopped")

    def _stop_quietly(self, device: SimDevice) -> None:
        try:
            self._stop_agent(device)
        except Exception as exc:  # one agent failing to stop must not keep the others running
            log_event(log, "sim_agent_stop_failed", level=logging.ERROR, device=device.device_id, detail=str(exc))

    def _event(self, device: SimDevice, what: str) -> None:
        with self._lock:
            self.events.append((time.monotonic() - self.started_at, device.device_id, what))
        log_event(log, "sim_event", device=device.device_id, what=what)

    def _load_loop(self, devices: Sequence[SimDevice]) -> None:
        rate = self.config.rate_per_device
        if rate <= 0 or not devices:
            return
        period = 1.0 / rate
        next_due = {d.device_id: time.monotonic() + (i * period / len(devices)) for i, d in enumerate(devices)}
        seed = self.config.seed
        while not self._stop.is_set():
            now = time.monotonic()
            soonest = now + period
            for device in devices:
                due = next_due[device.device_id]
                if due <= now:
                    next_due[device.device_id] = max(due + period, now)
                    if device.running and device.agent is not None:
                        try:
                            self._one_request(device, seed)
                        except Exception as exc:  # e.g. a slot folder removed by a rollback mid-read
                            log_event(log, "sim_request_skipped", device=device.device_id, detail=str(exc)[:200])
                soonest = min(soonest, next_due[device.device_id])
            self._stop.wait(max(0.0, soonest - time.monotonic()))

    def _one_request(self, device: SimDevice, seed: int) -> None:
        agent = device.agent
        assert agent is not None
        serving = agent.serving()
        if serving is None:
            device.stats.no_model += 1
            return
        if device.sampler is None or device.sampler_digest != serving.bundle_sha256:
            device_seed = zlib.crc32(f"{seed}:{device.device_id}".encode())
            device.sampler = InputSampler.from_bundle_dir(
                serving.folder,
                serving.inputs,
                seed=device_seed,
                source=self.config.input_source,
                cache_key=serving.bundle_sha256,  # one read of the pools per bundle and process, not per device
            )
            device.sampler_digest = serving.bundle_sha256
        inputs, labels = device.sampler.sample_labelled(1, device.drift)
        device.stats.requests += 1
        device.stats.served[serving.version] += 1
        share = self.config.feedback_share
        try:
            if labels is not None and share > 0 and (share >= 1 or random.random() < share):
                # The simulated application learns the true digit and reports it for this prediction.
                _, prediction = agent.predict_tracked(inputs)
                agent.feedback(prediction.prediction_id, label=int(labels[0]))
            else:
                agent.predict(inputs)
        except Exception:  # the agent counts model errors in its telemetry; we only count them here
            device.stats.errors += 1

    def _fault_loop(self) -> None:
        timeline: list[tuple[float, SimDevice, Fault, str]] = []
        for device in self.devices:
            for fault in device.faults:
                if fault.kind in (FaultKind.NETWORK_CUT, FaultKind.OFFLINE):
                    timeline.append((fault.num("after"), device, fault, "begin"))
                    timeline.append((fault.num("after") + fault.num("duration"), device, fault, "end"))
        timeline.sort(key=lambda item: item[0])
        watch = [(d, f) for d in self.devices for f in d.faults if f.kind == FaultKind.KILL_MID_UPDATE]
        while not self._stop.is_set():
            elapsed = time.monotonic() - self.started_at
            while timeline and timeline[0][0] <= elapsed:
                _, device, fault, phase = timeline.pop(0)
                self._apply(device, fault, phase)
            for device, fault in list(watch):
                if device.running and device.agent is not None and device.agent.crashed():
                    device.spent.append(fault)  # killed once; the restarted agent runs on
                    self._stop_agent(device, abrupt=True)
                    self._event(device, f"killed at step {fault.text('step')}")
                    watch.remove((device, fault))
                    restart_at = time.monotonic() - self.started_at + fault.num("restart_after")
                    timeline.append((restart_at, device, fault, "restart"))
                    timeline.sort(key=lambda item: item[0])
            self._stop.wait(0.05)

    def _apply(self, device: SimDevice, fault: Fault, phase: str) -> None:
        if fault.kind == FaultKind.NETWORK_CUT and device.proxy is not None:
            if phase == "begin":
                device.proxy.cut()
                self._event(device, "network cut")
            else:
                device.proxy.restore()
                self._event(device, "network restored")
        elif fault.kind == FaultKind.OFFLINE and phase == "begin":
            self._stop_agent(device)
        elif phase in ("end", "restart") and not device.running:
            assert device.agent is not None
            device.agent = self._new_agent(device)  # a fresh boot on the same folder
            self._start_agent(device)

    def set_drift(self, drift: Drift | None, device_ids: Sequence[str] | None = None) -> list[str]:
        """From the next request on, draw the inputs of ``device_ids`` (None: every device) through ``drift``
        (None: undrifted): a sensor fault that starts while the fleet runs. Returns the devices it applies to.

        Raises:
            FaultSpecError: a device id that is not in this fleet.
        """
        known = {d.device_id: d for d in self.devices}
        chosen = list(known) if device_ids is None else list(device_ids)
        missing = [d for d in chosen if d not in known]
        if missing:
            raise FaultSpecError(f"unknown device {missing[0]!r}")
        for device_id in chosen:
            known[device_id].drift = drift
            self._event(known[device_id], f"input drift set to {drift}")
        return chosen

    # ------------------------------------------------------------ observing

    def served(self, version: str) -> tuple[int, int]:
        """(devices that answered at least one request with ``version``, how many requests it answered)."""
        counts = [d.stats.served.get(version, 0) for d in self.devices]
        return sum(1 for c in counts if c), sum(counts)

    def snapshot(self) -> FleetSnapshot:
        """Counts right now: running agents, devices per serving version, requests and errors."""
        versions: Counter[str] = Counter()
        for device in self.devices:
            serving = device.agent.serving() if device.agent is not None and device.running else None
            versions[serving.version if serving else "-"] += 1
        return FleetSnapshot(
            at=time.monotonic() - self.started_at,
            running=sum(1 for d in self.devices if d.running),
            versions=dict(versions),
            requests=sum(d.stats.requests for d in self.devices),
            errors=sum(d.stats.errors for d in self.devices),
        )

    def status(self) -> dict[str, Any]:
        """A JSON-able status: the snapshot plus, per version, (devices that served it, requests it answered),
        and this process's threads, open file descriptors and MQTT connections (and polls when polling)."""
        snap = self.snapshot()
        versions = {v for d in self.devices for v in d.stats.served}
        out = {
            "at": snap.at,
            "devices": len(self.devices),
            "running": snap.running,
            "versions": snap.versions,
            "requests": snap.requests,
            "errors": snap.errors,
            "served": {v: list(self.served(v)) for v in sorted(versions)},
            "process": process_stats(),
        }
        if self._net is not None:
            out["mqtt_loop"] = self._net.stats()
        if self._poller is not None:
            out["polls"] = self._poller.stats()
        return out

    # ------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Stop the load, every agent (gracefully, in parallel) and the proxies. Idempotent."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        if self._poller is not None:
            self._poller.stop()
            self._poller = None
        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="edgeota-stop") as pool:
            list(pool.map(self._stop_quietly, self.devices))
        if self._net is not None:
            self._net.stop()
            self._net = None
        if self._hub is not None:
            self._hub.close()
            self._hub = None
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    def __enter__(self) -> FleetSimulator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def process_stats() -> dict[str, Any]:
    """This process's OS threads (Python's and native ones), Python threads, open file descriptors (Linux;
    None elsewhere) and resident memory in MiB."""
    try:
        fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = None
    threads: int | None = None
    rss: float | None = None
    try:
        import psutil

        proc = psutil.Process()
        threads, rss = proc.num_threads(), round(proc.memory_info().rss / 2**20, 1)
    except Exception:  # psutil missing or refused: report what is known
        pass
    return {"threads": threads, "python_threads": threading.active_count(), "fds": fds, "rss_mib": rss}
