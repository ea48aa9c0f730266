"""Many agents in one process (the fleet simulator's use): separate state, one MQTT client each, shared sessions."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from tests.agent.bundles import sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker


@pytest.mark.integration
def test_eight_agents_share_one_process(
    tmp_path: Path, keys: Keys, server: BundleServer, mqtt_broker: Broker, publish_bundle: Callable[..., BundleRef]
) -> None:
    before = threading.active_count()
    bundle = publish_bundle("1.0.0")
    cache = SessionCache()
    prefix = uuid.uuid4().hex[:8]
    ids = [f"sim-{prefix}-{i}" for i in range(8)]
    agents = [
        Agent(
            AgentConfig.load(write_config(tmp_path / d, keys, server.url, device_id=d, mqtt_port=mqtt_broker.port)),
            session_cache=cache,
        )
        for d in ids
    ]
    recorders = [Recorder(mqtt_broker.host, mqtt_broker.port, d) for d in ids]
    try:
        for agent in agents:
            agent.start()
        for agent, rec in zip(agents, recorders, strict=True):
            assert agent.transport is not None and agent.transport.wait_connected(15)
            rec.publish_cmd(signed(assignment(bundle, device_id=agent.device_id), keys.server))
        for agent, rec in zip(agents, recorders, strict=True):
            assert rec.wait_for(lambda r=rec: any(p.get("state") == "committed" for p in r.of("status")), 60)
            # every device only hears about itself
            assert {p.get("boot_id") for p in rec.of("status")} == {agent.boot_id}
        sessions = {id(a.runtime.current.session) for a in agents if a.runtime.current is not None}
        assert len(sessions) == 1  # one ONNX Runtime session for one bundle digest
        for agent in agents:
            assert agent.predict({"x": sample_inputs()})["y"].shape == (4, 10)
    finally:
        for agent in agents:
            agent.stop()
        for rec in recorders:
            rec.close()
    threading.Event().wait(0.5)
    assert threading.active_count() <= before + 2  # no threads left behind (paho may linger briefly)
