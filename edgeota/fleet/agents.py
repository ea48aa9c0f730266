"""The seam between the fleet simulator and the real device agent.

The simulator needs, per device: start, stop, an abrupt stop (the in-process stand-in for
``kill -9``: no goodbye, no final state write), predict, what is serving, and the update step in
progress. :class:`SimAgent` is that protocol; :func:`build_agent` wraps the device agent's own
:class:`device_agent.agent.Agent` (one instance per device, all sharing one ONNX Runtime session cache).

The simulator reaches the agent's network only through the agent's public constructor: it passes a
transport factory (:func:`fleet_transport`) that builds the agent's own transport
(:func:`device_agent.transport.factory.build_transport`) with the process's shared MQTT loop
(:class:`~edgeota.fleet.mqtt_loop.SharedNetworkLoop`) and, for devices configured with
``command_transport = "http_poll"``, a command source on the process's shared poller
(:class:`~edgeota.fleet.poll.SharedCommandPoller`) instead of a poller thread per agent.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgeota_contract.manifest import TensorSpec

if TYPE_CHECKING:
    from device_agent.settings import AgentConfig
    from device_agent.transport.base import Transport, TransportFactory
    from edgeota.fleet.mqtt_loop import SharedNetworkLoop
    from edgeota.fleet.poll import SharedCommandPoller


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

    def predict_tracked(self, inputs: dict[str, Any]) -> tuple[Any, Any]: ...

    def feedback(self, prediction_id: str, *, label: int) -> Any: ...

    def serving(self) -> Serving | None: ...

    def arm_crash(self, point: str) -> None: ...

    def crashed(self) -> bool: ...


def new_session_cache() -> Any:
    """One ONNX Runtime session cache for the whole fleet (sessions shared per bundle digest)."""
    from device_agent.serving.runtime import SessionCache

    return SessionCache(max_entries=32, intra_op_threads=1)


def fleet_transport(
    network_loop: SharedNetworkLoop | None = None, poller: SharedCommandPoller | None = None
) -> TransportFactory:
    """A transport factory for the agents of one simulator process.

    ``network_loop``: run every agent's MQTT link on it (None: paho's own thread per agent).
    ``poller``: the command source of agents whose settings say ``command_transport = "http_poll"``.
    """
    from device_agent.transport.factory import build_transport

    def build(config: AgentConfig, boot_id: str) -> Transport:
        source = None
        if poller is not None and config.settings.command_transport == "http_poll":
            server = config.provisioning.server
            source = poller.source(server.url, config.device_id, server.token)
        return build_transport(config, boot_id, network_loop=network_loop, command_source=source)

    return build


class RealAgent:
    """:class:`SimAgent` over :class:`device_agent.agent.Agent`.

    ``kill()`` is the in-process stand-in for ``kill -9``: the update worker is stopped at the start
    of the armed step by the agent's own crash hook (so the state folder holds exactly what a
    SIGKILL there leaves), and the transport is dropped without a goodbye (``Agent.stop(abrupt=True)``),
    so the broker publishes the device's last will. Unlike a real kill, the open telemetry window is
    still spooled.
    """

    def __init__(self, config_path: Path, session_cache: Any, transport: TransportFactory | None = None) -> None:
        from device_agent.agent import Agent
        from device_agent.settings import AgentConfig

        self._crash_point: str | None = None
        self._crashed = threading.Event()
        self.agent = Agent(
            AgentConfig.load(config_path), session_cache=session_cache, crash_hook=self._hook, transport=transport
        )

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

    def stop(self) -> None:
        self.agent.stop()

    def kill(self) -> None:
        self.agent.stop(abrupt=True)

    def predict(self, inputs: dict[str, Any]) -> Any:
        return self.agent.predict(inputs)

    def predict_tracked(self, inputs: dict[str, Any]) -> tuple[Any, Any]:
        """The agent's :meth:`~device_agent.agent.Agent.predict_tracked`: outputs and the remembered prediction."""
        return self.agent.predict_tracked(inputs)

    def feedback(self, prediction_id: str, *, label: int) -> Any:
        """Report the true ``label`` of a remembered prediction through the agent (spooled, sent over MQTT)."""
        return self.agent.feedback(prediction_id, label=label)

    def serving(self) -> Serving | None:
        model = self.agent.runtime.current
        if model is None:
            return None
        return Serving(model.manifest.version, model.bundle_sha256, model.folder, list(model.manifest.inputs))


def build_agent(config_path: Path, session_cache: Any, transport: TransportFactory | None = None) -> RealAgent:
    """A :class:`SimAgent` running the real device agent for ``config_path`` (``agent.toml``).

    ``transport``: see :func:`fleet_transport` (None: the agent's own default transport).

    Raises:
        ContractError: the agent configuration is invalid.
    """
    return RealAgent(config_path, session_cache, transport)
