"""Pull-based command delivery for the simulator: each device polls the server every P seconds.

The baseline a pull-based OTA system gives: the server holds commands, each device asks
``GET /api/v1/devices/{id}/commands`` (its own device token) every ``period`` seconds, starting at a
random phase in ``[0, period)`` so a fleet's polls are spread as they are in the field, and acts on
every signed command document in the answer exactly as if MQTT had carried it.

One :class:`CommandPoller` serves a whole simulator process with ``threads`` threads sharing one
HTTP connection pool, not a thread per device. Counters (:meth:`CommandPoller.stats`) tell how many
polls ran, failed and delivered commands.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeota_contract.logs import log_event

log = logging.getLogger(__name__)
COMMANDS_PATH = "/api/v1/devices/{device_id}/commands"


@dataclass(frozen=True)
class PollTarget:
    """One device: its id, its server and token, and what to call with each command document."""

    device_id: str
    server_url: str
    token: str
    deliver: Callable[[dict[str, Any]], None]
    active: Callable[[], bool]  # False while the device is offline (stopped, killed): it does not poll then


class CommandPoller:
    """Polls for every target every ``period`` seconds (random phase per device) until :meth:`stop`."""

    def __init__(self, targets: Sequence[PollTarget], period: float, seed: int = 0, threads: int = 2) -> None:
        if period <= 0:
            raise ValueError("the poll period must be positive")
        self.period = period
        self.targets = list(targets)
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        start = time.monotonic()
        self._due = [(start + self._rng.uniform(0, period), i) for i in range(len(self.targets))]
        heapq.heapify(self._due)
        self.polls = 0
        self.failed = 0
        self.delivered = 0
        self._threads = [
            threading.Thread(target=self._run, name=f"edgeota-poll-{i}", daemon=True) for i in range(max(1, threads))
        ]
        self._http: Any = None

    def start(self) -> None:
        import httpx

        self._http = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=len(self._threads) + 2))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=35)
        if self._http is not None:
            self._http.close()

    def stats(self) -> dict[str, Any]:
        return {"period_seconds": self.period, "polls": self.polls, "failed": self.failed, "delivered": self.delivered}

    def _next(self) -> int | None:
        """Wait for the next due poll and claim it (rescheduled one period later); None when stopping."""
        while not self._stop.is_set():
            with self._lock:
                when, index = self._due[0]
                wait = when - time.monotonic()
                if wait <= 0:
                    heapq.heapreplace(self._due, (max(when + self.period, time.monotonic()), index))
                    return index
            self._stop.wait(min(wait, 1.0))
        return None

    def _run(self) -> None:
        while (index := self._next()) is not None:
            target = self.targets[index]
            if target.active():
                self._poll(target)

    def _poll(self, target: PollTarget) -> None:
        url = target.server_url.rstrip("/") + COMMANDS_PATH.format(device_id=target.device_id)
        try:
            resp = self._http.get(url, headers={"Authorization": f"Bearer {target.token}"})
            resp.raise_for_status()
            commands = resp.json()["commands"]
        except Exception as exc:  # a device whose poll fails simply tries again next period
            with self._lock:
                self.polls += 1
                self.failed += 1
            log_event(log, "sim_poll_failed", level=logging.WARNING, device=target.device_id, detail=str(exc)[:200])
            return
        with self._lock:
            self.polls += 1
            self.delivered += len(commands)
        for command in commands:
            try:
                target.deliver(command)
            except Exception as exc:
                log_event(log, "sim_poll_deliver_failed", level=logging.ERROR, device=target.device_id, detail=str(exc))
