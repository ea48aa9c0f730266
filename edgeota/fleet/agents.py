"""The seam between the fleet simulator and the real device agent.

The simulator needs, per device: start, stop, an abrupt stop (the in-process stand-in for
``kill -9``: no goodbye, no final state write), predict, what is serving, and the update step in
progress. :class:`SimAgent` is that protocol; :func:`build_agent` wraps the device agent's own
:class:`device_agent.agent.Agent` (one instance per device, all sharing one ONNX Runtime session cache).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeota_contract.manifest import TensorSpec


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

    def __init__(self, config_path: Path, session_cache: Any) -> None:
        from device_agent.agent import Agent
        from device_agent.settings import AgentConfig

        self._crash_point: str | None = None
        self._crashed = threading.Event()
        self.agent = Agent(AgentConfig.load(config_path), session_cache=session_cache, crash_hook=self._hook)

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
        link = self.agent.link
        self.agent.link = None  # stop() must not say goodbye: a killed process cannot
        client = getattr(link, "_client", None) if link is not None else None
        if client is not None:
            client.loop_stop()
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self.agent.stop()

    def predict(self, inputs: dict[str, Any]) -> Any:
        return self.agent.predict(inputs)

    def serving(self) -> Serving | None:
        model = self.agent.runtime.current
        if model is None:
            return None
        return Serving(model.manifest.version, model.bundle_sha256, model.folder, list(model.manifest.inputs))


def build_agent(config_path: Path, session_cache: Any) -> SimAgent:
    """A :class:`SimAgent` running the real device agent for ``config_path`` (``agent.toml``).

    Raises:
        ContractError: the agent configuration is invalid.
    """
    return RealAgent(config_path, session_cache)
