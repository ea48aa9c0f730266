"""The paho side of the MQTT link (:class:`~device_agent.transport.mqtt.MqttLink`): the client class it uses
and the contract of a loop that drives many such clients.

:class:`PahoClient` is a paho client that remembers why its last connection attempt failed (for the
``mqtt_unreachable`` log line). :class:`NetworkLoop` is what a process hosting many links (the fleet simulator)
passes instead of one paho network thread per link; :class:`Cancellable` is what its ``call_later`` returns.
Both protocols are re-exported by :mod:`device_agent.transport.mqtt`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class NetworkLoop(Protocol):
    """Drives the network I/O of many paho clients on threads of its own (instead of one paho thread each).

    Contract: after :meth:`add` (called after ``connect_async``) the loop connects, reads, writes, keeps
    alive and reconnects ``client`` (after ``min_delay`` seconds, doubling up to ``max_delay``) until
    :meth:`remove` (after ``disconnect()``) or :meth:`abort` (drop the socket, no DISCONNECT). Paho's
    callbacks run on the loop's thread; :meth:`dispatch` runs ``fn`` off it, in order per ``key``;
    :meth:`call_later` runs ``fn`` once after ``delay`` seconds unless cancelled.
    """

    def add(self, client: mqtt.Client, min_delay: float = 1.0, max_delay: float = 30.0) -> None: ...

    def remove(self, client: mqtt.Client, timeout: float = 5.0) -> bool: ...

    def abort(self, client: mqtt.Client, timeout: float = 5.0) -> bool: ...

    def dispatch(self, key: str, fn: Callable[[], None]) -> None: ...

    def call_later(self, delay: float, fn: Callable[[], None], key: str = "") -> Cancellable: ...


class PahoClient(mqtt.Client):
    """A paho client that remembers why its last connection attempt failed (paho's ``on_connect_fail`` is not
    told): ``last_error`` is "" after a TCP connection was made."""

    last_error = ""

    def reconnect(self) -> MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as exc:
            self.last_error = describe_os_error(exc)
            raise
        self.last_error = ""
        return rc


def describe_os_error(exc: OSError) -> str:
    """``connection refused (errno 111)``-style text for a failed connect."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} (errno {exc.errno})" if exc.errno else text
