"""edgeota device agent: verified, crash-safe model swaps, inference and telemetry.

Imports nothing of torch, fastapi, sqlalchemy or onnx (tests/agent/test_import_light.py proves it).
``Agent`` is imported lazily so that ``edgeota agent status`` starts without ONNX Runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeota_contract.version import __version__

__all__ = ["Agent", "AgentConfig", "__version__"]

if TYPE_CHECKING:
    from device_agent.agent import Agent
    from device_agent.settings import AgentConfig


def __getattr__(name: str) -> Any:
    if name == "Agent":
        from device_agent.agent import Agent

        return Agent
    if name == "AgentConfig":
        from device_agent.settings import AgentConfig

        return AgentConfig
    raise AttributeError(name)
