"""One MQTT connection per agent (paho-mqtt 2.x).

Client id and username are the device id (the password, TLS and protocol come from ``[mqtt]``).
The last will is ``Presence(online=False)``, retained on the presence topic; on every connect
the link publishes ``Presence(online=True)``, subscribes to the device's own command topic
(QoS 1) and calls ``on_connect`` so the agent can check in and re-send unacknowledged reports.
With ``protocol = "auto"`` it speaks MQTT 5 and falls back to 3.1.1 when the broker refuses
or drops the MQTT 5 connection, or does not answer it within ``connect_probe_seconds``, before
any connection was ever accepted (amqtt, for one, never answers an MQTT 5 CONNECT).

Nothing here is global: many links can live in one process. By default each link runs paho's own
network thread (``loop_start``), which uses ``select()`` and so cannot serve sockets numbered above
1023: a few hundred links per process at most. A process that hosts many agents (the fleet simulator)
passes one :class:`SharedNetworkLoop` to all of them instead: one ``epoll`` thread drives every
client through paho's external-loop API, with no file descriptor limit but the process's own.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeota_contract.logs import log_event
from edgeota_contract.messages import Presence
from edgeota_contract.provisioning import MqttSection
from edgeota_contract.topics import Channel, device_topic

log = logging.getLogger("device_agent.mqtt")
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


class MqttLink:
    """The agent's connection to the broker. Thread-safe publish.

    With ``network_loop=None`` (real devices) paho's own thread runs the connection and the callbacks
    (``on_command``, ``on_connect``). With a :class:`SharedNetworkLoop` the loop's thread runs the
    connection and its dispatch workers run the callbacks, in order for this device.
    """

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        settings: MqttSection,
        on_command: Callable[[bytes], None],
        on_connect: Callable[[], None],
        *,
        network_loop: SharedNetworkLoop | None = None,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self.settings = settings
        self._on_command = on_command
        self._on_connect_cb = on_connect
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._ever_connected = False
        self._v5 = settings.protocol in ("auto", "5")
        self._client: mqtt.Client | None = None
        self._stopped = False
        self.protocol_in_use: str | None = None
        self.connect_probe_seconds = 5.0
        self._probe: threading.Timer | Cancellable | None = None
        self._loop = network_loop
        self._sub_mid: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect in the background; reconnects on its own until :meth:`stop`."""
        with self._lock:
            self._stopped = False
            self._client = self._make_client()
            self._client.connect_async(**self._connect_args())
            self._drive(self._client)
            if self._v5 and self.settings.protocol == "auto":
                # Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT: fall back if no CONNACK comes.
                if self._loop is not None:
                    self._probe = self._loop.call_later(self.connect_probe_seconds, self._probe_expired, self.device_id)
                else:
                    self._probe = threading.Timer(self.connect_probe_seconds, self._probe_expired)
                    self._probe.daemon = True
                    self._probe.start()

    def _drive(self, client: mqtt.Client) -> None:
        """Start running ``client``'s network I/O (paho's thread, or the shared loop)."""
        if self._loop is not None:
            self._loop.add(client, min_delay=1, max_delay=30)
        else:
            client.loop_start()

    def _release(self, client: mqtt.Client, timeout: float = 5.0) -> None:
        """Stop running ``client``'s network I/O, after ``disconnect()`` was called."""
        if self._loop is not None:
            self._loop.remove(client, timeout)
        else:
            client.loop_stop()

    def _background(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` off the network thread."""
        if self._loop is not None:
            self._loop.dispatch(self.device_id, fn)
        else:
            threading.Thread(target=fn, daemon=True).start()

    def _probe_expired(self) -> None:
        if not self._ever_connected and not self._stopped:
            self._fall_back()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``Presence(online=False)`` (a clean shutdown sends no last will), then disconnect."""
        with self._lock:
            self._stopped = True
            if self._probe is not None:
                self._probe.cancel()
            client = self._client
            self._client = None
        if client is None:
            return
        if self._connected.is_set():
            info = client.publish(self.topic(Channel.PRESENCE), self._presence(False), qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        client.disconnect()
        self._release(client, timeout)
        self._connected.clear()

    def abort(self) -> None:
        """Drop the connection without a DISCONNECT, as a killed process would (the broker then publishes
        the last will), and stop. Idempotent; ``start()`` connects again."""
        with self._lock:
            self._stopped = True
            if self._probe is not None:
                self._probe.cancel()
            client = self._client
            self._client = None
        if client is None:
            return
        if self._loop is not None:
            self._loop.abort(client)
        else:
            client.loop_stop()
            sock = client.socket()
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._connected.clear()

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        protocol = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {
            "callback_api_version": CallbackAPIVersion.VERSION2,
            "client_id": self.device_id,
            "protocol": protocol,
        }
        if not self._v5:
            kwargs["clean_session"] = False
        client = mqtt.Client(**kwargs)
        client.username_pw_set(s.username or self.device_id, s.password)
        if s.tls:
            client.tls_set(ca_certs=s.ca_file, certfile=s.cert_file, keyfile=s.key_file, cert_reqs=ssl.CERT_REQUIRED)
        client.will_set(self.topic(Channel.PRESENCE), self._presence(False), qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.max_queued_messages_set(1000)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_subscribe = self._handle_subscribe
        return client

    def _connect_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {
            "host": self.settings.host,
            "port": self.settings.port,
            "keepalive": self.settings.keepalive,
        }
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
            args["clean_start"] = False
            args["properties"] = props
        return args

    def _fall_back(self) -> None:
        """Rebuild the client for MQTT 3.1.1 (called off paho's thread)."""
        with self._lock:
            if self._stopped or not self._v5:
                return
            old = self._client
            self._v5 = False
            self._client = self._make_client()
            self._client.connect_async(**self._connect_args())
            self._drive(self._client)
        log_event(log, "mqtt_fallback_311", device=self.device_id)
        if old is not None:
            old.disconnect()
            self._release(old, 1.0)

    # ------------------------------------------------------------------ callbacks (paho thread)

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log_event(log, "mqtt_connect_refused", level=logging.WARNING, device=self.device_id, reason=str(reason))
            unsupported = getattr(reason, "value", None) in (1, 0x84)  # "unsupported protocol version"
            if unsupported and self._v5 and self.settings.protocol == "auto" and not self._ever_connected:
                self._background(self._fall_back)
            return
        self._ever_connected = True
        self.protocol_in_use = "5" if self._v5 else "3.1.1"
        _, self._sub_mid = client.subscribe(self.topic(Channel.CMD), qos=1)
        client.publish(self.topic(Channel.PRESENCE), self._presence(True), qos=1, retain=True)

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        # "Connected" means the command subscription is in place, so nothing sent to us from now on is missed.
        if mid != self._sub_mid:
            return
        self._connected.set()
        log_event(log, "mqtt_connected", device=self.device_id, protocol=self.protocol_in_use)
        if self._loop is not None:
            self._loop.dispatch(self.device_id, self._connected_cb)
        else:
            self._connected_cb()

    def _connected_cb(self) -> None:
        try:
            self._on_connect_cb()
        except Exception:  # a bug in the agent must not kill the network thread
            log.exception("on_connect callback failed")

    def _handle_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        log_event(log, "mqtt_disconnected", device=self.device_id, reason=str(reason))
        if self._v5 and self.settings.protocol == "auto" and not self._ever_connected and not self._stopped:
            self._background(self._fall_back)

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self.topic(Channel.CMD):
            return
        payload = bytes(message.payload)
        if self._loop is not None:
            self._loop.dispatch(self.device_id, lambda: self._command(payload))
        else:
            self._command(payload)

    def _command(self, payload: bytes) -> None:
        try:
            self._on_command(payload)
        except Exception:
            log.exception("command handler failed")

    # ------------------------------------------------------------------ publishing

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def _presence(self, online: bool) -> bytes:
        return Presence(online=online, boot_id=self.boot_id).model_dump_json().encode("utf-8")

    def publish(self, channel: Channel, payload: bytes) -> bool:
        """Send at QoS 1 when connected; returns False (nothing queued) when offline: the caller retries."""
        with self._lock:
            client = self._client
        if client is None or not self._connected.is_set():
            return False
        info = client.publish(self.topic(channel), payload, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS
