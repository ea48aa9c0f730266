"""One background thread per process that summarises telemetry batches off the request threads.

A :class:`~device_agent.telemetry.TelemetryRecorder` whose buffer reaches its limit hands the batch
to a :class:`Summariser` (:meth:`Summariser.submit`) and the request goes on: the request path only
appends. Every recorder in a process shares :data:`SHARED` (the fleet simulator runs thousands of
agents in one process: one thread, never one per agent).

Guarantees:

* Event-driven: the thread exists only while there is work or a recent batch. It blocks on a
  condition with nothing to do, and exits once ``linger_seconds`` pass without a job or as soon as
  the last attached recorder detaches (:meth:`Summariser.detach`); an idle agent that serves no
  requests never starts it. The next :meth:`Summariser.submit` starts a new thread.
* Jobs run one at a time, in submission order; a job that raises is logged and does not stop the
  thread. The thread is a daemon: it never holds a process open.
* Bounded memory is the recorder's job: when this thread falls behind, the recorder summarises on
  the request thread itself (see ``TelemetryRecorder``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable

from edgeota_contract.logs import log_event

__all__ = ["SHARED", "Summariser"]

log = logging.getLogger("device_agent.telemetry")

Job = Callable[[], object]


class Summariser:
    """A lazily started daemon thread that runs submitted jobs (recorders' batch summaries) in order.

    Thread-safe. ``linger_seconds``: how long the thread waits for the next job before it exits.
    """

    def __init__(self, linger_seconds: float = 10.0, name: str = "telemetry-summariser") -> None:
        self._linger = linger_seconds
        self._name = name
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # a job queued, or the last recorder detached
        self._idle = threading.Condition(self._lock)  # the queue ran empty and no job is running
        self._queue: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._users = 0  # attached recorders
        self._running = False
        self.jobs_run = 0
        """Jobs finished since this summariser was created (for tests and benchmarks)."""
        self.threads_started = 0
        """Threads started since this summariser was created (for tests and benchmarks)."""
        self.wakeups = 0
        """Times the thread woke from waiting for work (for tests: an idle thread does not wake)."""

    @property
    def thread(self) -> threading.Thread | None:
        """The worker thread while one runs, else None."""
        with self._lock:
            return self._thread

    def attach(self) -> None:
        """Count a recorder that may submit jobs (the thread exits early when none is attached)."""
        with self._lock:
            self._users += 1

    def detach(self, job: Job | None = None) -> None:
        """Undo one :meth:`attach`; drop ``job`` if it is still queued. Does not wait for a running job."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if job is not None:
                self._queue = deque(j for j in self._queue if j != job)
            self._work.notify()
            if not self._queue and not self._running:
                self._idle.notify_all()

    def submit(self, job: Job) -> None:
        """Queue ``job`` and wake (or start) the thread. Cheap: called once per batch, not per request."""
        with self._lock:
            self._queue.append(job)
            thread = self._thread
            if thread is None or not thread.is_alive():  # none yet, it exited, or lost in a fork
                thread = self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self.threads_started += 1
                thread.start()
            else:
                self._work.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job is queued or running; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: not self._queue and not self._running, timeout)

    def _next(self) -> Job | None:
        """The next job, or None when the thread should exit (called holding the lock)."""
        while not self._queue:
            if self._users <= 0:
                self._thread = None
                return None
            woken = self._work.wait(self._linger)
            self.wakeups += 1
            if not woken:
                if self._queue:  # a job arrived just as the wait timed out
                    break
                self._thread = None
                return None
        return self._queue.popleft()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._running = False
                if not self._queue:
                    self._idle.notify_all()
                job = self._next()
                if job is None:
                    return
                self._running = True
            try:
                self._run_job(job)
            except Exception as exc:  # a broken batch must not stop telemetry for every other agent
                log_event(log, "telemetry_summary_failed", level=logging.ERROR, detail=str(exc)[:300])
            self.jobs_run += 1

    def _run_job(self, job: Job) -> None:
        """Run one job (a seam for tests that inject a slow summariser)."""
        job()


SHARED = Summariser()
"""The process-wide summariser every recorder uses unless given another."""


def _after_fork() -> None:
    # A forked child has no copy of the thread, and the lock may have been held mid-fork. Reset in
    # place: recorders hold a reference to SHARED itself.
    SHARED._reset()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
