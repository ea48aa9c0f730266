"""The agent's background threads, event-driven so that an idle agent costs (almost) no CPU.

:class:`Ticker` is one thread that sleeps until the next real deadline (telemetry window roll,
heartbeat, report retry) or until the agent stops: no polling. :class:`UpdateWorker` is a
thread that exists only while there is update work: :meth:`UpdateWorker.wake` starts it (or tells
the running one to look again), and it ends when a pass finds nothing more to do. An idle agent
therefore has one sleeping thread, which wakes once per shortest interval (30 s by default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from device_agent.update.executor import Interrupted

log = logging.getLogger("device_agent")


@dataclass
class Timer:
    """An action run every ``interval`` seconds (the first time one interval after start)."""

    name: str
    interval: float
    action: Callable[[], None]
    due: float = 0.0


class Ticker:
    """Runs timers on one thread; an exception in an action is logged, never fatal."""

    def __init__(self, name: str, stop: threading.Event, timers: list[Timer]) -> None:
        self._name = name
        self._stop = stop
        self._timers = timers
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        now = time.monotonic()
        for t in self._timers:
            t.due = now + t.interval
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            due = min(t.due for t in self._timers)
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return
            now = time.monotonic()
            for t in self._timers:
                if now >= t.due:
                    t.due = now + t.interval
                    try:
                        t.action()
                    except Exception:
                        log.exception("agent %s timer error", t.name)

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class UpdateWorker:
    """Runs ``work`` on a thread of its own while there is work; starts on :meth:`wake`.

    ``work()`` does one pass and returns True when it should run again at once. A pass that
    raises :class:`Interrupted` (the agent is stopping, or a simulated kill) halts the worker for
    good: nothing more runs until the agent is started again. Any other exception is logged and
    the pass retried after a second. Guarantee: a :meth:`wake` is never lost: the worker checks for
    one, under the same lock, before it ends.
    """

    def __init__(self, name: str, stop: threading.Event, work: Callable[[], bool]) -> None:
        self._name = name
        self._stop = stop
        self._work = work
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.halted = False
        self.died = False  # ended by an unexpected BaseException (not a clean shutdown)

    def wake(self) -> None:
        """Ask for a pass; starts the thread when none runs."""
        with self._lock:
            self._wake.set()
            if self._stop.is_set() or self.halted:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    again = self._work()
                except Interrupted:
                    self.halted = True
                    return
                except Exception:
                    log.exception("update worker error")
                    self._stop.wait(1.0)
                    continue
                if again:
                    continue
                with self._lock:
                    if not self._wake.is_set():
                        self._thread = None
                        return
        except BaseException:
            self.died = True  # not a clean shutdown: a trial in progress keeps its boot attempt
            raise
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None

    def join(self, timeout: float) -> None:
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def alive(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()
