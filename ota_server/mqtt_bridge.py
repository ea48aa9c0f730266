"""The one module that talks MQTT (paho-mqtt 2.x).

Subscribes to every device's report channels and hands each message to the ingest writers
(:mod:`ota_server.ingest_queue`), which apply them in batches, one unit of work each, and only
after the commit acknowledge them and publish what they caused (re-sent assignments); the
network thread only parses the topic and queues, blocking while the writer's queue is full.
That is the only ingest path. Commands go out QoS 1, signed by the server key. Protocol ``auto``
tries MQTT 5 and falls back to 3.1.1 (the embedded demo broker speaks only 3.1.1).
Malformed payloads, unknown devices and reports for unknown deployments are logged,
counted and dropped; the network thread never dies on a bad message. With ``mqtt_shared_group`` the
subscriptions are MQTT shared subscriptions (``$share/<group>/...``): the broker gives each message to one
process of the group, so several processes (``edgeota server ingest``) split the ingest; with
``mqtt_subscribe = false`` the process only publishes.
"""

from __future__ import annotations

import logging
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeota_contract.logs import log_event
from edgeota_contract.topics import Channel, device_topic, server_subscriptions
from ota_server.context import ServerContext
from ota_server.ingest_queue import IngestWriters

log = logging.getLogger("edgeota.server.mqtt")
# QoS 1 commands (acks, assignments) in flight on the server's connection (paho's default is 20). Not
# more: paho scans its in-flight messages on every PUBACK, which at 1,000 took 11% of the server's samples.
MAX_INFLIGHT = 100


class MqttBridge:
    """Owns the paho client; implements the ``Publisher`` protocol for the rest of the server."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.client: mqtt.Client | None = None
        self.protocol: str | None = None
        self.connected = threading.Event()
        self._stopping = False
        self._refused = threading.Event()
        self.writers = IngestWriters(ctx)

    # ---------------------------------------------------------------- connection

    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        s = self.ctx.settings
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=s.resolved_mqtt_client_id,
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else False,
        )
        if s.mqtt_username:
            client.username_pw_set(s.mqtt_username, s.mqtt_password.get_secret_value() if s.mqtt_password else None)
        if s.mqtt_tls:
            client.tls_set(
                ca_certs=str(s.mqtt_ca_file) if s.mqtt_ca_file else None, tls_version=ssl.PROTOCOL_TLS_CLIENT
            )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        return client

    def _try(self, protocol: MQTTProtocolVersion, timeout: float) -> bool:
        s = self.ctx.settings
        client = self._make_client(protocol)
        self.connected.clear()
        self._refused = threading.Event()
        kwargs: dict[str, Any] = {"keepalive": 30}
        if protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
            kwargs["clean_start"] = False
            kwargs["properties"] = props
        try:
            client.connect(s.mqtt_host, s.mqtt_port, **kwargs)
        except OSError as exc:
            log_event(log, "mqtt_connect_failed", logging.WARNING, error=str(exc))
            return False
        client.loop_start()
        self.client = client
        waited = 0.0
        while waited < timeout:
            if self.connected.wait(0.1):
                return True
            if self._refused.is_set():
                break
            waited += 0.1
        # disconnect() first, so a network thread waiting to reconnect ends at once.
        client.disconnect()
        client.loop_stop()
        self.client = None
        return False

    def start(self, timeout: float = 10.0) -> bool:
        """Connect (MQTT 5 first when ``auto``) and start the network thread; False if the broker refused."""
        self.writers.start()
        wanted = self.ctx.settings.mqtt_protocol
        attempts = {"5": [mqtt.MQTTv5], "3.1.1": [mqtt.MQTTv311], "auto": [mqtt.MQTTv5, mqtt.MQTTv311]}[wanted]
        for protocol in attempts:
            if self._try(protocol, timeout / len(attempts)):
                self.protocol = "5" if protocol == mqtt.MQTTv5 else "3.1.1"
                log_event(log, "mqtt_connected", protocol=self.protocol, host=self.ctx.settings.mqtt_host)
                return True
        # Keep trying in the background (paho reconnects with backoff); commands wait in the DB meanwhile.
        fallback = attempts[-1]
        client = self._make_client(fallback)
        self.protocol = "5" if fallback == mqtt.MQTTv5 else "3.1.1"
        client.connect_async(self.ctx.settings.mqtt_host, self.ctx.settings.mqtt_port, keepalive=30)
        client.loop_start()
        self.client = client
        log_event(
            log, "mqtt_unavailable_retrying", logging.ERROR, host=self.ctx.settings.mqtt_host, protocol=self.protocol
        )
        return False

    def stop(self) -> None:
        """Stop intake, apply what is queued (up to 5 s; the rest is abandoned unacked), then disconnect."""
        self._stopping = True
        self.writers.stop()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if getattr(reason_code, "is_failure", False):
            log_event(log, "mqtt_refused", logging.ERROR, reason=str(reason_code))
            self._refused.set()
            return
        settings = self.ctx.settings
        group = settings.mqtt_shared_group
        # The broker keeps a persistent session's subscriptions: drop the ones this configuration does not want.
        unwanted = server_subscriptions() if group or not settings.mqtt_subscribe else []
        if group and not settings.mqtt_subscribe:
            unwanted += server_subscriptions(group)
        if unwanted:
            client.unsubscribe(unwanted)
        if settings.mqtt_subscribe:
            for topic in server_subscriptions(group):
                client.subscribe(topic, qos=1)
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if not self.connected.is_set():
            self._refused.set()  # closed before CONNACK: e.g. a 3.1.1-only broker meeting MQTT 5
        self.connected.clear()
        if not self._stopping:
            log_event(log, "mqtt_disconnected", logging.WARNING, reason=str(reason_code))

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.writers.submit(msg.topic, bytes(msg.payload))
        except Exception as exc:  # keep the network thread alive whatever happens
            self.ctx.metrics.inc("ingest_error")
            log_event(log, "ingest_error", logging.ERROR, error=repr(exc))

    # ---------------------------------------------------------------- publishing

    def publish_command(self, device_id: str, payload: bytes) -> bool:
        client = self.client
        if client is None:
            return False
        props = None
        if self.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.MessageExpiryInterval = int(self.ctx.settings.assignment_ttl_seconds)
        info = client.publish(device_topic(device_id, Channel.CMD), payload, qos=1, properties=props)
        return info.rc == mqtt.MQTT_ERR_SUCCESS
