"""The agent's default transport, chosen by the ``command_transport`` setting.

``mqtt`` (default): one :class:`~device_agent.transport.mqtt.MqttLink` carries commands and reports.
``http_poll``: a :class:`~device_agent.transport.poll.PolledTransport` whose commands come from an
:class:`~device_agent.transport.poll.HttpCommandPoller` (every ``command_poll_seconds``) and whose
reports go over that same kind of MQTT link (the server takes reports only over MQTT).
"""

from __future__ import annotations

from device_agent.settings import AgentConfig
from device_agent.transport.base import CommandSource, Transport
from device_agent.transport.mqtt import MqttLink, NetworkLoop
from device_agent.transport.poll import HttpCommandPoller, PolledTransport


def build_transport(
    config: AgentConfig,
    boot_id: str,
    *,
    network_loop: NetworkLoop | None = None,
    command_source: CommandSource | None = None,
) -> Transport:
    """The transport ``config`` asks for (a :data:`~device_agent.transport.base.TransportFactory`).

    ``network_loop``: run the MQTT link on this shared loop rather than paho's own thread.
    ``command_source``: with ``command_transport = "http_poll"``, take commands from this source instead
    of a poller of the agent's own (the fleet simulator shares one poller between many agents).
    """
    s = config.settings
    link = MqttLink(
        config.device_id,
        boot_id,
        config.provisioning.mqtt,
        network_loop=network_loop,
        connect_probe_seconds=s.mqtt_connect_probe_seconds,
    )
    if s.command_transport == "mqtt":
        return link
    server = config.provisioning.server
    source = command_source or HttpCommandPoller(
        server.url,
        config.device_id,
        server.token,
        s.command_poll_seconds,
        allow_insecure_http=s.allow_insecure_http,
    )
    return PolledTransport(source, link)
