"""One thread that drives the network I/O of many paho-mqtt clients (the fleet simulator's MQTT loop).

paho's own per-client thread (``loop_start``) uses ``select()``, which cannot watch a socket numbered
1024 or above, and costs a thread per connection. :class:`SharedNetworkLoop` serves every client of a
process from one ``selectors`` (epoll) thread through paho's external-loop API, and runs their callbacks
on a few dispatch workers, in order per client. It satisfies the agent's
:class:`device_agent.transport.mqtt.NetworkLoop`, so the agent's MQTT link runs on it when given one;
real devices keep paho's own thread.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from edgeota_contract.logs import log_event

log = logging.getLogger(__name__)
SESSION_EXPIRY_SECONDS = 24 * 3600


class Cancellable:
    """A scheduled call (:meth:`SharedNetworkLoop.call_later`); :meth:`cancel` stops it if it has not run."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Entry:
    client: mqtt.Client
    min_delay: float
    max_delay: float
    delay: float
    wanted: bool = True  # reconnect whenever the connection drops
    sock: Any = None
    events: int = 0
    closed: threading.Event = field(default_factory=threading.Event)


class SharedNetworkLoop:
    """One thread driving the network I/O of many paho clients (``selectors``: epoll on Linux).

    A client handed to :meth:`add` (after ``connect_async``) is connected, read, written and kept alive,
    and whenever its connection drops it is reconnected after ``min_delay`` seconds, doubling up to
    ``max_delay`` (reset once connected), as paho's own loop does, until :meth:`remove` or
    :meth:`abort`. Each client costs one file descriptor (its socket) and no thread.

    Paho's callbacks (``on_connect``, ``on_message`` ...) run on the loop thread, so they must be quick:
    slow work goes to :meth:`dispatch`, whose ``workers`` threads run tasks in order per key.
    :meth:`call_later` timers run on those workers too.

    Thread-safety: every public method may be called from any thread; the selector is only touched by
    the loop thread (other threads queue their requests and wake it through a socket pair).
    """

    def __init__(self, name: str = "mqtt-shared", workers: int = 4, tick_seconds: float = 1.0) -> None:
        self.name = name
        self.tick_seconds = tick_seconds
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._calls: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}  # id(client) -> entry
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # run on the loop thread
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._ident: int | None = None
        self._thread: threading.Thread | None = None
        self._queues: list[queue.SimpleQueue[Callable[[], None] | None]] = [
            queue.SimpleQueue() for _ in range(max(1, workers))
        ]
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the loop thread and the dispatch workers (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        for i, q in enumerate(self._queues):
            worker = threading.Thread(target=self._work, args=(q,), name=f"{self.name}-worker-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, timeout: float = 10.0) -> None:
        """Drop every connection still managed (no DISCONNECT), end the threads. Idempotent."""
        self._stop.set()
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for q in self._queues:
            q.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout)
        self._workers.clear()

    @property
    def thread_count(self) -> int:
        """Threads this loop runs: its own plus the dispatch workers."""
        return (1 if self._thread is not None else 0) + len(self._workers)

    def stats(self) -> dict[str, int]:
        """Clients managed, of which connected, and this loop's threads."""
        with self._lock:
            entries = list(self._entries.values())
        return {
            "clients": len(entries),
            "connected": sum(1 for e in entries if e.client.is_connected()),
            "threads": self.thread_count,
        }

    # ------------------------------------------------------------------ clients

    def add(self, client: mqtt.Client, min_delay: float = 1.0, max_delay: float = 30.0) -> None:
        """Drive ``client`` (``connect_async`` already called): connect now, reconnect whenever it drops."""
        client.on_socket_open = self._on_open
        client.on_socket_close = self._on_close
        client.on_socket_register_write = self._on_want_write
        client.on_socket_unregister_write = None  # the loop syncs write interest itself after every operation
        entry = _Entry(client, min_delay, max_delay, min_delay)
        with self._lock:
            self._entries[id(client)] = entry
        self._call(lambda: self._connect(entry))

    def remove(self, client: mqtt.Client, timeout: float = 5.0) -> bool:
        """Stop reconnecting ``client`` and forget it once its socket is closed.

        Call ``client.disconnect()`` first: paho closes the socket once the DISCONNECT is written. A
        socket still open after ``timeout`` seconds is dropped. Returns whether it closed in time (from
        the loop's own threads it does not wait and returns False).
        """
        with self._lock:
            entry = self._entries.get(id(client))
        if entry is None:
            return True
        self._call(lambda: self._release(entry))
        if self._on_loop_thread() or self._thread is None:
            return False
        if entry.closed.wait(timeout):
            return True
        self._call(lambda: self._abort(entry))
        return entry.closed.wait(1.0)

    def abort(self, client: mqtt.Client, timeout: float = 5.0) -> bool:
        """Drop ``client``'s connection without a DISCONNECT (the broker then publishes its last will)
        and forget it. Returns whether that happened within ``timeout`` (no wait on the loop's threads)."""
        with self._lock:
            entry = self._entries.get(id(client))
        if entry is None:
            return True
        self._call(lambda: self._abort(entry))
        if self._on_loop_thread() or self._thread is None:
            return False
        return entry.closed.wait(timeout)

    def dispatch(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` on a worker thread; tasks with the same ``key`` run one at a time, in order."""
        self._queues[zlib.crc32(key.encode("utf-8")) % len(self._queues)].put(fn)

    def call_later(self, delay: float, fn: Callable[[], None], key: str = "") -> Cancellable:
        """Run ``fn`` on a worker thread (see :meth:`dispatch`) after ``delay`` seconds, unless cancelled."""
        handle = Cancellable(fn)

        def fire() -> None:
            if not handle.cancelled:
                self.dispatch(key, lambda: None if handle.cancelled else handle.fn())

        self._call(lambda: self._at(time.monotonic() + delay, fire))
        return handle

    # ------------------------------------------------------------------ paho callbacks

    def _on_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop_thread():
            self._call(lambda: self._opened(client, sock))
        else:
            self._opened(client, sock)

    def _on_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Unregister now, before paho closes the socket: its fd number may be reused at once.
        if self._on_loop_thread():
            self._closed(client, sock)
        else:
            self._call(lambda: self._closed(client, sock))

    def _on_want_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if not self._on_loop_thread():  # a publish from another thread: write it from the loop thread
            with self._lock:
                entry = self._entries.get(id(client))
            if entry is not None:
                self._call(lambda: self._write(entry))

    # ------------------------------------------------------------------ loop thread

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def _call(self, fn: Callable[[], None]) -> None:
        self._calls.append(fn)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is already pending
            self._wake_w.send(b"x")

    def _at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._seq), fn))

    def _run(self) -> None:
        self._ident = threading.get_ident()
        next_tick = time.monotonic() + self.tick_seconds
        while not self._stop.is_set():
            now = time.monotonic()
            due = min(next_tick, self._timers[0][0]) if self._timers else next_tick
            for key, mask in self._sel.select(max(0.0, min(due - now, self.tick_seconds))):
                if key.data is None:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(65536)
                    continue
                self._service(key.data, key.fileobj, mask)
            while self._calls:
                self._guard(self._calls.popleft())
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                self._guard(heapq.heappop(self._timers)[2])
            if now >= next_tick:
                next_tick = now + self.tick_seconds
                self._tick()
        self._shutdown()

    def _guard(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # one client's failure must not stop the others
            log.exception("shared MQTT loop: task failed")

    def _service(self, entry: _Entry, sock: Any, mask: int) -> None:
        if entry.sock is not sock:
            return
        try:
            if mask & selectors.EVENT_READ:
                entry.client.loop_read()
                # TLS: bytes already decrypted into the SSL buffer raise no epoll event; read them now.
                while entry.sock is not None and getattr(entry.sock, "pending", lambda: 0)() > 0:
                    entry.client.loop_read()
            if mask & selectors.EVENT_WRITE and entry.sock is not None:
                entry.client.loop_write()
        except Exception:
            log.exception("shared MQTT loop: client I/O failed")
        self._sync(entry)

    def _sync(self, entry: _Entry) -> None:
        """Ask the selector for write readiness exactly when paho has bytes waiting to be sent."""
        if entry.sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if entry.client.want_write() else 0)
        if events != entry.events:
            self._sel.modify(entry.sock, events, entry)
            entry.events = events

    def _write(self, entry: _Entry) -> None:
        if entry.sock is not None:
            entry.client.loop_write()
            self._sync(entry)

    def _opened(self, client: mqtt.Client, sock: Any) -> None:
        with self._lock:
            entry = self._entries.get(id(client))
        if entry is None:
            return
        with contextlib.suppress(KeyError):  # a stale registration of a reused fd number
            self._sel.unregister(sock)
        self._sel.register(sock, selectors.EVENT_READ, entry)
        entry.sock, entry.events = sock, selectors.EVENT_READ

    def _closed(self, client: mqtt.Client, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)
        with self._lock:
            entry = self._entries.get(id(client))
        if entry is None or entry.sock is not sock:
            return
        entry.sock, entry.events = None, 0
        if entry.wanted:
            self._schedule_connect(entry)
        else:
            self._forget(entry)

    def _schedule_connect(self, entry: _Entry) -> None:
        self._at(time.monotonic() + entry.delay, lambda: self._connect(entry))
        entry.delay = min(entry.delay * 2, entry.max_delay)

    def _connect(self, entry: _Entry) -> None:
        if not entry.wanted or entry.sock is not None:
            return
        try:
            entry.client.reconnect()  # TCP connect (blocking, bounded by the client's connect_timeout)
        except Exception as exc:  # refused, unreachable, timed out: try again later
            log_event(log, "mqtt_connect_failed", level=logging.DEBUG, detail=str(exc))
            if entry.sock is None:
                self._schedule_connect(entry)
            return
        self._sync(entry)

    def _release(self, entry: _Entry) -> None:
        entry.wanted = False
        if entry.sock is None:
            self._forget(entry)
        else:
            self._sync(entry)  # a queued DISCONNECT gets written; paho then closes the socket

    def _abort(self, entry: _Entry) -> None:
        entry.wanted = False
        sock = entry.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(Exception):
                entry.client.loop_read()  # paho reads the EOF, closes the socket and reports the disconnect
            if entry.sock is sock:  # paho did not close it: do it here
                self._closed(entry.client, sock)
                with contextlib.suppress(OSError):
                    sock.close()
        self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        with self._lock:
            self._entries.pop(id(entry.client), None)
        entry.closed.set()

    def _tick(self) -> None:
        """Keepalive pings and timeouts, backoff reset, and any write a racing publish left pending."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            if entry.sock is None:
                continue
            try:
                entry.client.loop_misc()
                if entry.client.is_connected():
                    entry.delay = entry.min_delay
                if entry.client.want_write() and entry.sock is not None:
                    entry.client.loop_write()
            except Exception:
                log.exception("shared MQTT loop: housekeeping failed")
            self._sync(entry)

    def _shutdown(self) -> None:
        while self._calls:
            self._guard(self._calls.popleft())
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            self._guard(lambda entry=entry: self._abort(entry))  # type: ignore[misc]
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _work(self, q: queue.SimpleQueue[Callable[[], None] | None]) -> None:
        while True:
            fn = q.get()
            if fn is None:
                return
            try:
                fn()
            except Exception:
                log.exception("shared MQTT loop: dispatched task failed")
