"""The MQTT transport: one connection per agent (paho-mqtt 2.x), commands in and reports out.

:class:`MqttLink` implements :class:`~device_agent.transport.base.Transport`. Client id and username
are the device id (the password, TLS and protocol come from ``[mqtt]``). The last will is
``Presence(online=False)``, retained on the presence topic; on every connect the link publishes
``Presence(online=True)``, subscribes to the device's own command topic (QoS 1) and, once the
subscription is granted, calls ``on_connected`` so the agent can check in and re-send unacknowledged
reports. With ``protocol = "auto"`` it speaks MQTT 5 and falls back to 3.1.1 when the broker refuses
or drops the MQTT 5 connection, or does not answer it within ``connect_probe_seconds``, before any
connection was ever accepted (amqtt, for one, never answers an MQTT 5 CONNECT).

Only the link's current paho client speaks for it: callbacks of a client it replaced (the MQTT 5 client after a
fall-back) are ignored, so a late "disconnected" from that client never marks the live connection offline.
Every failed connection attempt is logged with its reason (``mqtt_unreachable``), and observers
(:meth:`MqttLink.observe`) get a :class:`~device_agent.transport.status.LinkStatus` after each change. A second agent
with the same device id is recognised (:class:`~device_agent.transport.status.TakeoverDetector`), logged as an
error (``mqtt_duplicate_device``) and answered with a growing reconnect delay instead of a fight every second.

Nothing here is global: many links can live in one process. By default each link runs paho's own
network thread (``loop_start``), which uses ``select()`` and so cannot serve sockets numbered above
1023: a few hundred links per process at most. A process that hosts many agents (the fleet simulator)
passes one :class:`NetworkLoop` to all of them instead, e.g. one ``epoll`` thread driving every client
through paho's external-loop API. That protocol and the paho client class are in
:mod:`device_agent.transport.paho_client`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent.transport.base import CommandCallback, ConnectedCallback
from device_agent.transport.paho_client import Cancellable, NetworkLoop, PahoClient
from device_agent.transport.status import LinkState, LinkStatus, StatusCallback, TakeoverDetector
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Presence
from edgeota_contract.provisioning import MqttSection
from edgeota_contract.topics import Channel, device_topic

__all__ = ["SESSION_EXPIRY_SECONDS", "Cancellable", "MqttLink", "NetworkLoop"]  # the protocols: re-exported

log = logging.getLogger("device_agent.mqtt")
SESSION_EXPIRY_SECONDS = 24 * 3600


class MqttLink:
    """The agent's connection to the broker (a :class:`~device_agent.transport.base.Transport`). Thread-safe send.

    With ``network_loop=None`` (real devices) paho's own thread runs the connection and the callbacks
    (``on_command``, ``on_connected``). With a :class:`NetworkLoop` the loop's thread runs the
    connection and its dispatch workers run the callbacks, in order for this device.
    """

    def __init__(
        self,
        device_id: str,
        boot_id: str,
        settings: MqttSection,
        *,
        network_loop: NetworkLoop | None = None,
        connect_probe_seconds: float = 5.0,
    ) -> None:
        self.device_id = device_id
        self.boot_id = boot_id
        self.settings = settings
        self._on_command: CommandCallback = _ignore_command
        self._on_connect_cb: ConnectedCallback = _nothing
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._ever_connected = False
        self._v5 = settings.protocol in ("auto", "5")
        self._client: mqtt.Client | None = None
        self._stopped = False
        self.protocol_in_use: str | None = None
        self.connect_probe_seconds = connect_probe_seconds
        self._probe: threading.Timer | Cancellable | None = None
        self._loop = network_loop
        self._sub_mid: int | None = None
        self._observers: list[StatusCallback] = []
        self._failures = 0
        self._takeover = TakeoverDetector(device_id)

    # ------------------------------------------------------------------ lifecycle

    def start(self, on_command: CommandCallback, on_connected: ConnectedCallback) -> None:
        """Connect in the background; reconnects on its own until :meth:`stop` or :meth:`abort`."""
        with self._lock:
            self._on_command = on_command
            self._on_connect_cb = on_connected
            self._stopped = False
            self._client = self._make_client()
            self._client.connect_async(**self._connect_args())
            self._drive(self._client)
            if self._v5 and self.settings.protocol == "auto":
                self._arm_probe()
        self._emit("connecting")

    def observe(self, callback: StatusCallback) -> None:
        """Call ``callback`` with a :class:`LinkStatus` after every change (on the network thread; keep it short)."""
        self._observers.append(callback)

    def _emit(self, state: LinkState, reason: str = "") -> None:
        status = LinkStatus(state, reason, self._failures, self._takeover.last_evidence)
        for callback in list(self._observers):
            try:
                callback(status)
            except Exception:  # an observer's bug must not kill the network thread
                log.exception("link status observer failed")

    def _arm_probe(self) -> None:
        """Some 3.1.1-only brokers (amqtt) never answer an MQTT 5 CONNECT: fall back if no CONNACK comes."""
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
        if self._ever_connected or self._stopped:
            return
        client = self._client
        if isinstance(client, PahoClient) and client.last_error:
            # Not even a TCP connection: nothing refused MQTT 5 yet, so keep it until a broker answers (or not).
            with self._lock:
                if not self._stopped:
                    self._arm_probe()
            return
        self._fall_back()

    def _detach(self) -> mqtt.Client | None:
        """Mark the link stopped and take its client (None when it had none)."""
        with self._lock:
            self._stopped = True
            if self._probe is not None:
                self._probe.cancel()
            client = self._client
            self._client = None
        return client

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``Presence(online=False)`` (a clean shutdown sends no last will), then disconnect."""
        client = self._detach()
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
        client = self._detach()
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
        client = PahoClient(**kwargs)
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
        client.on_connect_fail = self._handle_connect_fail
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

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # No TCP (or TLS) connection at all; paho retries after its doubling delay (1 s up to 30 s).
        if client is not self._client:
            return
        self._failures += 1
        error = client.last_error if isinstance(client, PahoClient) else ""
        reason = error or "connection failed"
        log_event(
            log,
            "mqtt_unreachable",
            level=logging.WARNING,
            device=self.device_id,
            broker=f"{self.settings.host}:{self.settings.port}",
            reason=reason,
            attempt=self._failures,
            retry_in_s=int(self._takeover.backoff) or min(30, 2 ** (self._failures - 1)),
        )
        self._emit("unreachable", f"cannot reach broker {self.settings.host}:{self.settings.port}: {reason}")

    def _handle_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if client is not self._client:
            return  # a client this link replaced (fall-back): its news is not ours
        if reason.is_failure:
            self._failures += 1
            log_event(
                log,
                "mqtt_connect_refused",
                level=logging.WARNING,
                device=self.device_id,
                reason=str(reason),
                attempt=self._failures,
            )
            self._emit("refused", f"broker {self.settings.host}:{self.settings.port} refused the connection: {reason}")
            unsupported = getattr(reason, "value", None) in (1, 0x84)  # "unsupported protocol version"
            if unsupported and self._v5 and self.settings.protocol == "auto" and not self._ever_connected:
                self._background(self._fall_back)
            return
        self._ever_connected = True
        self._failures = 0
        self._takeover.connected(time.monotonic())
        self.protocol_in_use = "5" if self._v5 else "3.1.1"
        _, self._sub_mid = client.subscribe(self.topic(Channel.CMD), qos=1)
        client.publish(self.topic(Channel.PRESENCE), self._presence(True), qos=1, retain=True)

    def _handle_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        # "Connected" means the command subscription is in place, so nothing sent to us from now on is missed.
        if client is not self._client or mid != self._sub_mid:
            return
        self._connected.set()
        log_event(log, "mqtt_connected", device=self.device_id, protocol=self.protocol_in_use)
        self._emit("connected")
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
        # A replaced client's late disconnect would otherwise mark the live connection offline for good (nothing
        # sets it again until the next reconnect), and every report would wait for a retry that cannot send.
        if client is not self._client:
            return
        self._connected.clear()
        log_event(log, "mqtt_disconnected", device=self.device_id, reason=str(reason))
        if self._v5 and self.settings.protocol == "auto" and not self._ever_connected and not self._stopped:
            self._background(self._fall_back)
            return
        if self._stopped:
            return
        evidence = self._takeover.disconnected(time.monotonic(), getattr(reason, "value", None), str(reason))
        if evidence is not None:
            log_event(log, "mqtt_duplicate_device", level=logging.ERROR, device=self.device_id, detail=evidence)
            if self._loop is None:  # paho's own thread reconnects; a shared loop keeps its own delays
                client.reconnect_delay_set(min_delay=int(self._takeover.backoff), max_delay=int(self._takeover.backoff))
            self._emit("duplicate", evidence)
            return
        if self._takeover.backoff == 0 and self._loop is None:
            client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._emit("disconnected", f"connection to the broker lost: {reason}")

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if client is not self._client or message.topic != self.topic(Channel.CMD):
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

    def send(self, channel: Channel, payload: bytes) -> bool:
        """Publish at QoS 1 when connected; returns False (nothing queued) when offline: the caller retries."""
        with self._lock:
            client = self._client
        if client is None or not self._connected.is_set():
            return False
        info = client.publish(self.topic(channel), payload, qos=1)
        return info.rc == mqtt.MQTT_ERR_SUCCESS


def _ignore_command(payload: bytes) -> None:
    """Before :meth:`MqttLink.start` nothing is subscribed, so nothing arrives here."""


def _nothing() -> None:
    pass
