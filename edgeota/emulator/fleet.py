"""Many emulated devices in one process: one shared MQTT loop, a download pool, one timer thread.

:class:`EmulatedFleet` provisions devices through the server's API (or takes provisioning files), connects
each as its own MQTT session on :class:`edgeota.fleet.mqtt_loop.SharedNetworkLoop` (one epoll thread, no
thread per device), runs command handling and downloads on a small pool of workers (per device in order),
and from one timer thread sends each device's telemetry window every ``telemetry_seconds``, a check-in every
``heartbeat_seconds``, and re-sends unacknowledged messages as the agent does (after ``resend_seconds``, doubling).

:meth:`EmulatedFleet.snapshot` says how many devices are connected, serve which version, and how many
telemetry windows were sent. :meth:`EmulatedFleet.stop` removes every retained presence message it left and
disconnects cleanly.
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from edgeota.emulator.device import EmulatedDevice
from edgeota.fleet.mqtt_loop import SharedNetworkLoop
from edgeota_contract.provisioning import DeviceProvisioning


@dataclass(frozen=True)
class EmulatorConfig:
    devices: int
    server_url: str
    admin_token: str
    profiles: tuple[str, ...] = ("x86",)
    prefix: str = "emu"
    labels: Mapping[str, str] = field(default_factory=dict)
    telemetry_seconds: float = 10.0
    heartbeat_seconds: float = 120.0
    resend_seconds: float = 30.0
    """First re-send of an unacknowledged message, then doubling up to ``resend_max_seconds`` (the agent's defaults)."""
    resend_max_seconds: float = 600.0
    requests_per_window: int = 50
    workers: int = 8
    """Threads handling commands and downloads (per device in order)."""
    fail_versions: frozenset[str] = frozenset()
    provision_threads: int = 8


@dataclass(frozen=True)
class FleetSnapshot:
    devices: int
    connected: int
    versions: dict[str, int]
    committed: int
    failed: int
    telemetry_sent: int
    unacked: int
    rejected_commands: int
    download_bytes: int
    download_failures: dict[str, int]
    """Devices by the reason of their last failed download."""
    reused: int = 0
    """Installs that skipped the download because the device kept the archive (a rollback to the release before)."""


class EmulatedFleet:
    """See the module docstring. Use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.loop = SharedNetworkLoop(name="emulator-mqtt", workers=config.workers)
        limits = httpx.Limits(max_connections=config.workers * 2, max_keepalive_connections=config.workers * 2)
        self.http = httpx.Client(timeout=60, limits=limits)
        self.devices: list[EmulatedDevice] = []
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    # ------------------------------------------------------------------ set-up

    def provision(self, progress: Callable[[int], None] | None = None) -> list[DeviceProvisioning]:
        """Register ``config.devices`` devices with the server (concurrently); returns their provisioning."""
        cfg = self.config
        api = httpx.Client(base_url=cfg.server_url, headers={"Authorization": f"Bearer {cfg.admin_token}"}, timeout=60)
        done = [0]
        lock = threading.Lock()

        def one(index: int) -> DeviceProvisioning:
            body = {
                "device_id": f"{cfg.prefix}-{index:06d}",
                "hardware_profile": cfg.profiles[index % len(cfg.profiles)],
                "labels": {"fleet": cfg.prefix, **cfg.labels},
            }
            resp = api.post("/api/v1/devices", json=body)
            if resp.status_code != 201:
                raise RuntimeError(f"provisioning {body['device_id']} failed: {resp.status_code} {resp.text[:200]}")
            prov = DeviceProvisioning.model_validate(tomllib.loads(resp.json()["agent_toml"]))
            with lock:
                done[0] += 1
                if progress is not None and done[0] % 500 == 0:
                    progress(done[0])
            return prov

        try:
            with ThreadPoolExecutor(cfg.provision_threads) as pool:
                return list(pool.map(one, range(cfg.devices)))
        finally:
            api.close()

    def add(self, provisions: Iterable[DeviceProvisioning]) -> None:
        cfg = self.config
        for prov in provisions:
            device = EmulatedDevice(
                prov,
                self.http,
                self.loop.dispatch,
                cfg.fail_versions,
                requests_per_window=cfg.requests_per_window,
                resend_seconds=cfg.resend_seconds,
                resend_max_seconds=cfg.resend_max_seconds,
            )
            self.devices.append(device)

    def start(self, connect_per_second: float = 2000.0) -> None:
        """Connect every device (at most ``connect_per_second``) and start the timers."""
        self.loop.start()
        gap = 1.0 / connect_per_second
        for device in self.devices:
            self.loop.add(device.client, min_delay=1.0, max_delay=30.0)
            time.sleep(gap)
        self._timer = threading.Thread(target=self._tick, name="emulator-timer", daemon=True)
        self._timer.start()

    def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(d.connected.is_set() for d in self.devices):
                return True
            time.sleep(0.2)
        return False

    def _tick(self) -> None:
        cfg = self.config
        n = max(1, len(self.devices))
        # Spread each device's windows and check-ins over the period, so the fleet does not send in bursts.
        next_window = {id(d): time.monotonic() + cfg.telemetry_seconds * (i / n) for i, d in enumerate(self.devices)}
        next_checkin = {id(d): time.monotonic() + cfg.heartbeat_seconds * (i / n) for i, d in enumerate(self.devices)}
        next_resend = time.monotonic() + 1.0
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for device in self.devices:
                key = id(device)
                if now >= next_window[key]:
                    next_window[key] = now + cfg.telemetry_seconds
                    if device.connected.is_set():
                        self.loop.dispatch(device.device_id, device.send_telemetry)
                if now >= next_checkin[key]:
                    next_checkin[key] = now + cfg.heartbeat_seconds
                    if device.connected.is_set():
                        self.loop.dispatch(device.device_id, device.checkin)
            if now >= next_resend:
                next_resend = now + 1.0  # each message has its own due time (see EmulatedDevice.resend_due)
                for device in self.devices:
                    if device.connected.is_set():
                        device.resend_due()

    # ------------------------------------------------------------------ reading

    def snapshot(self) -> FleetSnapshot:
        versions: Counter[str] = Counter()
        totals: Counter[str] = Counter()
        failures: Counter[str] = Counter()
        for device in self.devices:
            with device.lock:
                for model in device.models.values():
                    versions[model.version] += 1
                c = device.counters
                totals["committed"] += c.committed
                totals["failed"] += c.failed
                totals["telemetry_sent"] += c.telemetry_sent
                totals["unacked"] += len(device.unacked)
                totals["rejected"] += c.rejected
                totals["bytes"] += c.download_bytes
                totals["reused"] += c.reused
                if c.last_failure:
                    failures[c.last_failure] += 1
            totals["connected"] += int(device.connected.is_set())
        return FleetSnapshot(
            devices=len(self.devices),
            connected=totals["connected"],
            versions=dict(versions),
            committed=totals["committed"],
            failed=totals["failed"],
            telemetry_sent=totals["telemetry_sent"],
            unacked=totals["unacked"],
            rejected_commands=totals["rejected"],
            download_bytes=totals["bytes"],
            download_failures=dict(failures),
            reused=totals["reused"],
        )

    # ------------------------------------------------------------------ tear-down

    def stop_telemetry(self) -> None:
        """Stop sending windows and check-ins (re-sending of unacknowledged messages goes on until stop)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)

    def drain(self, timeout: float) -> bool:
        """Re-send until every message is acknowledged (after :meth:`stop_telemetry`); True when none is left."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(d.unacked for d in self.devices):
                return True
            for device in self.devices:
                device.resend_due(older_than=min(5.0, self.config.resend_seconds))
            time.sleep(0.5)
        return not any(d.unacked for d in self.devices)

    def leave(self, timeout: float = 30.0) -> dict[str, int]:
        """Remove every retained presence message (waiting up to ``timeout`` s for the broker's acks), then end
        every session with a DISCONNECT, so the broker publishes no last will; stops the loop.

        Returns ``presence_not_cleared`` (clearing messages the broker had not acknowledged in time, plus devices
        not connected when asked) and ``disconnects_aborted`` (sessions dropped without a DISCONNECT, those not
        closed within another ``timeout`` seconds included: their will, a retained "offline", is left on the broker).
        """
        self.stop_telemetry()
        infos: list[mqtt.MQTTMessageInfo] = []
        offline = 0
        for device in self.devices:
            if device.connected.is_set():
                infos.append(device.clear_presence())
            else:
                offline += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(info.is_published() for info in infos):
            time.sleep(0.2)
        missing = sum(1 for info in infos if not info.is_published())
        # The disconnects get as long again; what is left then is dropped by the loop's stop (a busy loop at
        # 10,000 devices took minutes per thousand, one removal at a time).
        deadline = time.monotonic() + timeout

        def leave_one(device: EmulatedDevice) -> bool:
            # DISCONNECT and removal together: the loop reconnects a closed session it still manages after a
            # second, so disconnecting every device before removing any let the last ones come back online
            # (and their last will then left a retained "offline").
            if time.monotonic() >= deadline:
                return False
            device.client.disconnect()
            return self.loop.remove(device.client, timeout=max(0.05, min(5.0, deadline - time.monotonic())))

        with ThreadPoolExecutor(16) as pool:
            aborted = sum(1 for ok in pool.map(leave_one, self.devices) if not ok)
        self.loop.stop()
        self.http.close()
        return {"presence_not_cleared": missing + offline, "disconnects_aborted": aborted}

    def stop(self) -> None:
        self.leave()

    def __enter__(self) -> EmulatedFleet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
