"""An agent restarted with unsent telemetry, followed to a real server's de-duplication.

A real `edgeota server run` process and the real broker. An agent serves requests while it cannot reach
any broker: its telemetry windows wait in its on-disk spool, and it is stopped abruptly. The next agent
on the same state folder reaches the broker while the server is down (the server's persistent MQTT
session queues what arrives), re-sends the spool, and is stopped abruptly too, nothing acknowledged; a
third one re-sends it again, so the broker holds two copies of each window. The server comes up, stores
each window once and acknowledges it; the agent's spool drains to empty.
"""

from __future__ import annotations

import sqlite3
import time
import tomllib
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import write_keypair
from tests.agent.bundles import sample_inputs
from tests.agent.conftest import PROFILE, BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.conftest import Broker, free_port
from tests.server.conftest import Keys as ServerKeys
from tests.server.procs import ServerProcess

pytestmark = pytest.mark.integration


def _spooled(state_dir: Path) -> list[str]:
    with sqlite3.connect(state_dir / "telemetry.sqlite") as conn:
        return [str(r[0]) for r in conn.execute("SELECT msg_id FROM windows ORDER BY id")]


def _stored(db: Path, device_id: str) -> list[tuple[str, int]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT boot_id, seq FROM telemetry_windows WHERE device_id = ?", (device_id,))
        return [(str(b), int(s)) for b, s in rows]


def test_unsent_telemetry_is_resent_after_a_restart_and_stored_once(
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    mqtt_broker: Broker,
    publish_bundle: Callable[..., BundleRef],
) -> None:
    _, release_pub = write_keypair(tmp_path / "server-keys" / "release.pem", keys.release)
    db = tmp_path / "server.db"
    ota = ServerProcess(tmp_path, f"sqlite:///{db}", ServerKeys(keys.release, release_pub), mqtt_broker)
    device_id = f"spool-{uuid.uuid4().hex[:8]}"
    try:
        ota.start()  # once, so the broker keeps the server's session (and queues for it) while it is down
        toml = ota.api("POST", "/api/v1/devices", json={"device_id": device_id, "hardware_profile": PROFILE})
        server_key = DeviceProvisioning.model_validate(tomllib.loads(toml["agent_toml"])).trust.server_keys[0]
        ota.stop()

        dead_port = free_port()  # nothing listens here: the first agent reaches no broker
        path = write_config(tmp_path / "dev", keys, server.url, device_id=device_id, mqtt_port=dead_port)
        prov = DeviceProvisioning.load(path)
        prov.trust.server_keys.append(server_key)  # the real server signs the acks
        path.write_text(prov.to_toml())
        state_dir = tmp_path / "dev" / "state"

        first = Agent(AgentConfig.load(path), session_cache=SessionCache())
        first.start()
        try:
            first.handle_command(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
            assert first.wait_idle(30)
            until = time.monotonic() + 2.5  # windows are 1 s long: several close
            while time.monotonic() < until:
                first.predict({"x": sample_inputs()})
                time.sleep(0.01)
        finally:
            first.stop(abrupt=True)  # as a killed process
        unsent = _spooled(state_dir)
        assert len(unsent) >= 2, unsent

        prov.mqtt.port = mqtt_broker.port  # the network is back
        path.write_text(prov.to_toml())
        for _ in range(2):  # two restarts, each re-sending the whole spool while the server is down
            again = Agent(AgentConfig.load(path), session_cache=SessionCache())
            again.start()
            try:
                assert again.transport is not None and again.transport.wait_connected(15)
                time.sleep(2.0)
            finally:
                again.stop(abrupt=True)
            assert _spooled(state_dir)[: len(unsent)] == unsent  # still unacknowledged

        with Agent(AgentConfig.load(path), session_cache=SessionCache()) as last:
            assert last.transport is not None and last.transport.wait_connected(15)
            ota.start()
            deadline = time.monotonic() + 60
            while len(last.outbox.spool) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(last.outbox.spool) == 0, "the spool did not drain"
        stored = _stored(db, device_id)
        first_boot = [row for row in stored if row[0] == first.boot_id]
        assert len(first_boot) == len(unsent) and len(set(first_boot)) == len(first_boot)  # each once, none lost
        assert len(stored) == len(set(stored))
        assert ota.api("GET", "/api/v1/metrics").get("ingest_duplicate", 0) >= 1  # copies arrived and were dropped
    finally:
        ota.stop()
        ota.http.close()
