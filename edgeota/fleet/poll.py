"""One HTTP command poller for a whole simulator process: many agents, a few threads.

Each simulated agent runs with ``command_transport = "http_poll"``; instead of a poller thread of its
own (:class:`device_agent.transport.poll.HttpCommandPoller`), it gets a
:class:`~device_agent.transport.base.CommandSource` from :meth:`SharedCommandPoller.source`, through the
agent's transport seam. The shared poller asks ``GET /api/v1/devices/{id}/commands`` (each device's own
token, through the agent's own :func:`~device_agent.transport.poll.fetch_commands`) every ``period``
seconds per device, starting at a random phase in ``[0, period)`` so a fleet's polls are spread as they
are in the field, and hands every signed command document to that device's agent, which verifies it.
A device polls only while its source is started (its agent runs). Counters (:meth:`SharedCommandPoller.stats`)
tell how many polls ran, failed and delivered commands.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import logging
import random
import threading
import time
from typing import Any

from device_agent.transport.base import CommandCallback
from device_agent.transport.poll import fetch_commands, poll_url
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event

log = logging.getLogger(__name__)


class PolledDevice:
    """One device's :class:`~device_agent.transport.base.CommandSource` on a :class:`SharedCommandPoller`."""

    def __init__(self, poller: SharedCommandPoller, server_url: str, device_id: str, token: str) -> None:
        self.poller = poller
        self.device_id = device_id
        self.url = poll_url(server_url, device_id)
        self.token = token
        self.on_command: CommandCallback | None = None  # None: stopped, not polled
        self.scheduled = False

    def start(self, on_command: CommandCallback) -> None:
        self.poller._activate(self, on_command)

    def stop(self, timeout: float = 5.0) -> None:
        """No poll of this device starts after this returns (one under way may still deliver; a stopped agent
        ignores it)."""
        with self.poller._lock:
            self.on_command = None


class SharedCommandPoller:
    """Polls every started :class:`PolledDevice` every ``period`` seconds on ``threads`` threads until :meth:`stop`."""

    def __init__(self, period: float, seed: int = 0, threads: int = 2) -> None:
        """Raises ValueError for a period that is not positive."""
        if period <= 0:
            raise ValueError("the poll period must be positive")
        self.period = period
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._order = itertools.count()  # ties in the heap never compare devices
        self._due: list[tuple[float, int, PolledDevice]] = []
        self.polls = 0
        self.failed = 0
        self.delivered = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"edgeota-poll-{i}", daemon=True) for i in range(max(1, threads))
        ]

    def source(self, server_url: str, device_id: str, token: str) -> PolledDevice:
        """A command source for one device (what :func:`device_agent.transport.factory.build_transport` takes)."""
        return PolledDevice(self, server_url, device_id, token)

    def _activate(self, device: PolledDevice, on_command: CommandCallback) -> None:
        with self._lock:
            device.on_command = on_command
            if not device.scheduled:
                device.scheduled = True
                when = time.monotonic() + self._rng.uniform(0, self.period)
                heapq.heappush(self._due, (when, next(self._order), device))
                self._wake.notify()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._wake.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=35)

    def stats(self) -> dict[str, Any]:
        return {"period_seconds": self.period, "polls": self.polls, "failed": self.failed, "delivered": self.delivered}

    def _next(self) -> PolledDevice | None:
        """Wait for the next due poll of a started device and claim it (rescheduled one period later)."""
        with self._lock:
            while not self._stop.is_set():
                if not self._due:
                    self._wake.wait(1.0)
                    continue
                when, _, device = self._due[0]
                wait = when - time.monotonic()
                if wait > 0:
                    self._wake.wait(min(wait, 1.0))
                    continue
                heapq.heappop(self._due)
                if device.on_command is None:  # stopped: forget it until it starts again
                    device.scheduled = False
                    continue
                heapq.heappush(self._due, (max(when + self.period, time.monotonic()), next(self._order), device))
                return device
        return None

    def _run(self) -> None:
        while (device := self._next()) is not None:
            self._poll(device)

    def _poll(self, device: PolledDevice) -> None:
        try:
            payloads = fetch_commands(device.url, device.token)
        except (OSError, http.client.HTTPException, EdgeotaError) as exc:  # the device tries again next period
            with self._lock:
                self.polls += 1
                self.failed += 1
            log_event(log, "sim_poll_failed", level=logging.WARNING, device=device.device_id, detail=str(exc)[:200])
            return
        with self._lock:
            self.polls += 1
            self.delivered += len(payloads)
        for payload in payloads:
            deliver = device.on_command
            if deliver is None:
                return
            try:
                deliver(payload)
            except Exception as exc:
                log_event(log, "sim_poll_deliver_failed", level=logging.ERROR, device=device.device_id, detail=str(exc))
