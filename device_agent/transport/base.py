"""The agent's transport seam: how signed commands reach the agent and how its reports leave it.

The agent depends on :class:`Transport` only. A transport carries bytes: it never verifies,
parses or acknowledges anything itself. Every command payload goes to the agent's command
handler, which checks the server's signature, the device id and freshness as it always did, so a
transport cannot make the agent act on anything the server did not sign. Re-sending and
acknowledgement stay in :class:`~device_agent.transport.outbox.Outbox`: :meth:`Transport.send`
answers only "handed over" or "not now".

Implementations in this package (:func:`~device_agent.transport.factory.build_transport` picks one
from the ``command_transport`` setting):

- :class:`~device_agent.transport.mqtt.MqttLink`: commands and reports over MQTT (the default).
- :class:`~device_agent.transport.poll.PolledTransport`: commands from HTTP polls
  (:class:`~device_agent.transport.poll.HttpCommandPoller`), reports over MQTT, because the
  server takes (and acknowledges) reports only over MQTT. A transport with reports over HTTP would
  need a server endpoint for them.

Other code (the fleet simulator) plugs its own transports in through the agent's constructor
(``Agent(config, transport=factory)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edgeota_contract.topics import Channel

if TYPE_CHECKING:
    from device_agent.settings import AgentConfig

CommandCallback = Callable[[bytes], None]
"""Called with one raw command payload (a ``SignedCommand`` JSON document), unverified."""

ConnectedCallback = Callable[[], None]
"""Called each time reports can flow again (after every (re)connect)."""


@runtime_checkable
class CommandSource(Protocol):
    """Where signed commands come from, and nothing else (e.g. an HTTP poller)."""

    def start(self, on_command: CommandCallback) -> None:
        """Begin delivering commands to ``on_command`` (on a thread of the source's own)."""
        ...

    def stop(self, timeout: float = 5.0) -> None:
        """Stop polling; no new poll starts after this returns. Idempotent. (A command fetched just before
        may still be delivered while ``stop`` runs: the agent ignores commands once stopped.)"""
        ...


@runtime_checkable
class Transport(Protocol):
    """One agent's link to the server: signed commands in, reports out.

    Guarantees an implementation gives: ``on_command`` gets each payload as received, never a
    parsed or altered one, and never raises into the transport (the agent's handler catches
    everything); ``on_connected`` runs after every (re)connect, once the transport would deliver
    every command sent from then on; :meth:`send` never blocks for long and never queues (the
    outbox keeps what was not handed over and re-sends it). Presence (``online`` / ``offline``) is
    the transport's business: MQTT announces it on connect, on :meth:`stop` and by its last will.
    """

    def start(self, on_command: CommandCallback, on_connected: ConnectedCallback) -> None:
        """Connect in the background and keep reconnecting until :meth:`stop` or :meth:`abort`."""
        ...

    def stop(self, timeout: float = 5.0) -> None:
        """Say goodbye (presence ``offline``) and disconnect. Idempotent."""
        ...

    def abort(self) -> None:
        """Drop the connection without a goodbye, as a killed process would. Idempotent."""
        ...

    @property
    def connected(self) -> bool:
        """Whether :meth:`send` can hand reports over now."""
        ...

    def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for :attr:`connected`; returns it."""
        ...

    def send(self, channel: Channel, payload: bytes) -> bool:
        """Hand one report (``status``, ``checkin`` or ``telemetry``) over for delivery; False: not now."""
        ...


TransportFactory = Callable[["AgentConfig", str], Transport]
"""Builds a fresh transport for ``(config, boot_id)``; the agent calls it on every :meth:`Agent.start`."""
