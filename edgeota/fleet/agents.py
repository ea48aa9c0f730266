"""The seam between the fleet simulator and the real device agent.

The simulator needs, per device: start, stop, an abrupt stop (the in-process stand-in for
``kill -9``: no goodbye, no final state write), predict, what is serving, and the update step in
progress. :class:`SimAgent` is that protocol; :func:`build_agent` wraps the device agent's own
:class:`device_agent.agent.Agent` (one instance per device, all sharing one ONNX Runtime session cache
and, optionally, one :class:`~device_agent.mqtt_loop.SharedNetworkLoop` that runs every agent's MQTT
connection on one thread).

In ``commands_by_poll`` mode an agent acts only on commands its simulator fetched over HTTP
(:meth:`RealAgent.handle_polled`): assignments arriving over MQTT are dropped, while acks of its
reports and check-in requests are still taken from MQTT (the server acks only there).
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeota_contract.logs import log_event
from edgeota_contract.manifest import TensorSpec

log = logging.getLogger(__name__)
# Command kinds a polling device still takes from MQTT: they start no work, and acks only travel there.
MQTT_KINDS_WHEN_POLLING = frozenset({"ack", "checkin_request"})


@dataclass(frozen=True)
class Serving:
    version: str
    bundle_sha256: str
    folder: Path
    inputs: list[TensorSpec]


class SimAgent(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def kill(self) -> None: ...

    def predict(self, inputs: dict[str, Any]) -> Any: ...

    def serving(self) -> Serving | None: ...

    def arm_crash(self, point: str) -> None: ...

    def crashed(self) -> bool: ...


def new_session_cache() -> Any:
    """One ONNX Runtime session cache for the whole fleet (sessions shared per bundle digest)."""
    from device_agent.runtime import SessionCache

    return SessionCache(max_entries=32, intra_op_threads=1)


class RealAgent:
    """:class:`SimAgent` over :class:`device_agent.agent.Agent`.

    ``kill()`` is the in-process stand-in for ``kill -9``: the update worker is stopped at the start
    of the armed step by the agent's own crash hook (so the state folder holds exactly what a
    SIGKILL there leaves), and the MQTT socket is dropped without a DISCONNECT, so the broker
    publishes the device's last will. Unlike a real kill, the open telemetry window is still spooled.
    """

    def __init__(
        self,
        config_path: Path,
        session_cache: Any,
        network_loop: Any | None = None,
        commands_by_poll: bool = False,
    ) -> None:
        from device_agent.agent import Agent
        from device_agent.settings import AgentConfig

        self._crash_point: str | None = None
        self._crashed = threading.Event()
        self._commands_by_poll = commands_by_poll
        self.dropped_mqtt_commands = 0
        kwargs: dict[str, Any] = {}
        # The link is attached here (not by Agent.start) when assignments must be filtered, or when this
        # agent version cannot take a shared network loop yet.
        self._attach_loop: Any | None = None
        self._attach = commands_by_poll or (network_loop is not None and not agent_takes_network_loop())
        if self._attach:
            kwargs["connect"] = False
            self._attach_loop = network_loop
        elif network_loop is not None:
            kwargs["mqtt_network_loop"] = network_loop
        self.agent = Agent(AgentConfig.load(config_path), session_cache=session_cache, crash_hook=self._hook, **kwargs)

    def _hook(self, point: str) -> None:
        from device_agent.update.executor import Interrupted

        if self._crash_point is not None and point == self._crash_point:
            self._crash_point = None
            self._crashed.set()
            raise Interrupted(f"simulated kill at {point}")

    def arm_crash(self, point: str) -> None:
        self._crash_point = point

    def crashed(self) -> bool:
        return self._crashed.is_set()

    def start(self) -> None:
        self.agent.start()
        if self._attach:
            self._connect()

    def _connect(self) -> None:
        """What ``Agent.start`` does when it connects, through the agent's public API, plus the filter."""
        from device_agent.mqtt_link import MqttLink

        agent = self.agent
        link = MqttLink(
            agent.device_id,
            agent.boot_id,
            agent.config.provisioning.mqtt,
            self._on_mqtt_command,
            self._on_connected,
            network_loop=self._attach_loop,
        )
        link.connect_probe_seconds = agent.settings.mqtt_connect_probe_seconds
        agent.link = link
        agent.outbox.link = link
        link.start()

    def _on_connected(self) -> None:
        self.agent.outbox.reconnected()
        self.agent.send_checkin()
        self.agent.flush(force=True)

    def _on_mqtt_command(self, payload: bytes) -> None:
        if self._commands_by_poll and command_kind(payload) not in MQTT_KINDS_WHEN_POLLING:
            self.dropped_mqtt_commands += 1
            return
        self.agent.handle_command(payload)

    def handle_polled(self, command: dict[str, Any]) -> None:
        """Act on one signed command document fetched over HTTP (the same document MQTT would carry)."""
        self.agent.handle_command(json.dumps(command).encode("utf-8"))

    def stop(self) -> None:
        self.agent.stop()

    def kill(self) -> None:
        link = self.agent.link
        self.agent.link = None  # stop() must not say goodbye: a killed process cannot
        if link is not None:
            link.abort()  # the broker sees the connection drop without a DISCONNECT and publishes the last will
        self.agent.stop()

    def predict(self, inputs: dict[str, Any]) -> Any:
        return self.agent.predict(inputs)

    def serving(self) -> Serving | None:
        model = self.agent.runtime.current
        if model is None:
            return None
        return Serving(model.manifest.version, model.bundle_sha256, model.folder, list(model.manifest.inputs))


def agent_takes_network_loop() -> bool:
    """Whether ``device_agent.agent.Agent`` accepts ``mqtt_network_loop`` (added by the agent's owner)."""
    from device_agent.agent import Agent

    return "mqtt_network_loop" in inspect.signature(Agent.__init__).parameters


def command_kind(payload: bytes) -> str | None:
    """The ``kind`` inside a signed command document (not verified: the agent verifies what it acts on)."""
    try:
        body = json.loads(json.loads(payload)["body"])
        kind = body.get("kind")
    except (ValueError, KeyError, TypeError, AttributeError):
        log_event(log, "sim_command_unparsed", level=logging.DEBUG)
        return None
    return kind if isinstance(kind, str) else None


def build_agent(
    config_path: Path, session_cache: Any, network_loop: Any | None = None, commands_by_poll: bool = False
) -> RealAgent:
    """A :class:`SimAgent` running the real device agent for ``config_path`` (``agent.toml``).

    ``network_loop``: a :class:`~device_agent.mqtt_loop.SharedNetworkLoop` to run the agent's MQTT link
    on (None: the link's own paho thread). ``commands_by_poll``: see the module docstring.

    Raises:
        ContractError: the agent configuration is invalid.
    """
    return RealAgent(config_path, session_cache, network_loop, commands_by_poll)
