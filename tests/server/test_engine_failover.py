"""One rollout engine across server processes, taken over when its holder dies (PostgreSQL advisory lock).

In process: the lock is exclusive, survives its holder's ticks, is lost with its connection, and refuses to run
off PostgreSQL. End to end: two real ``edgeota server run`` processes on one PostgreSQL database and one server
key; the one leading the engine is killed with SIGKILL in the middle of a staged rollout, and the other takes the
engine over and finishes the rollout on every simulated device.
"""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine

from edgeota_contract.errors import ContractError
from ota_server.core.config import Settings
from ota_server.engine_leader import ADVISORY_KEY, AdvisoryLockLeadership, choose
from ota_server.main import build_context
from tests.conftest import Broker

from .conftest import BundleFactory, Keys
from .procs import ServerProcess
from .simdevice import SimDevice
from .test_server_process import provision, publish, rollout_state, wait_for

pytestmark = pytest.mark.integration


def test_advisory_lock_is_exclusive_and_lost_with_its_connection(pg_url: str) -> None:
    engine = create_engine(pg_url)
    key = ADVISORY_KEY ^ uuid.uuid4().int % 1000  # a key of this test's own: other runs hold the real one
    first, second = AdvisoryLockLeadership(engine, key), AdvisoryLockLeadership(engine, key)
    try:
        assert first.acquire() and first.acquire()  # kept across ticks
        assert not second.acquire()
        assert first._conn is not None
        first._conn.invalidate()  # what a dead process's connection amounts to
        assert not first.acquire() or not second.acquire()  # at most one holds it afterwards
        first.release()
        assert second.acquire()
        second.release()
        assert first.acquire()
        first.release()
    finally:
        engine.dispose()
    assert choose(engine, "auto") == "advisory_lock" and choose(engine, "lease") == "lease"
    assert choose(create_engine("sqlite://"), "auto") == "lease"


def test_advisory_lock_off_postgresql_is_refused_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine_leadership="advisory_lock", mqtt_enabled=False)
    with pytest.raises(ContractError, match="advisory_lock' needs PostgreSQL, not sqlite"):
        build_context(settings)


def _leads(server: ServerProcess) -> bool:
    """The server's JSON log says its engine took the lead."""
    return '"event": "engine_leader"' in server.log.read_text()


def _leader(servers: list[ServerProcess]) -> ServerProcess | None:
    leading = [s for s in servers if _leads(s)]
    return leading[0] if len(leading) == 1 else None


def test_engine_fails_over_when_its_holder_is_killed_mid_rollout(
    tmp_path: Path, pg_url: str, keys: Keys, mqtt_broker: Broker, make_bundle: BundleFactory
) -> None:
    servers = [ServerProcess(tmp_path / name, pg_url, keys, mqtt_broker) for name in ("a", "b")]
    for server in servers:
        server.log.parent.mkdir(parents=True, exist_ok=True)
        # One deployment: both processes sign commands with the same key (devices trust one server key).
        server.env["EDGEOTA_SERVER_SERVER_KEY"] = str(tmp_path / "server_key.pem")
    a, b = servers
    with a.running(), b.running():
        leader = wait_for(lambda: _leader(servers), 20, "one engine leader")
        other = b if leader is a else a
        tag = f"f{uuid.uuid4().hex[:8]}"
        release = publish(other, make_bundle("1.0.0", "x86"))["release_id"]
        sims = [SimDevice(p) for p in provision(other, 6, tag)]
        other.sims.extend(sims)
        for sim in sims:
            sim.connect()
        body = {
            "release_id": release,
            "selector": {"labels": {"tag": tag}},
            "stages": [
                {"count": 2, "soak_seconds": 4},
                {"count": 4, "soak_seconds": 4},
                {"percent": 100, "soak_seconds": 0},
            ],
            "start": True,
        }
        rid = other.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
        wait_for(lambda: rollout_state(other, rid)["counts"].get("committed", 0) >= 2, 60, "the first stage")
        assert rollout_state(other, rid)["state"] == "running"
        leader.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: _leads(other), 30, "the other server to take the engine over")
        took_over = time.monotonic() - killed_at
        done = wait_for(
            lambda: rollout_state(other, rid)["state"] != "running" and rollout_state(other, rid), 90, "end"
        )
        assert done["state"] == "completed", done
        assert done["counts"].get("committed") == 6
        assert all(sim.models["digits"].version == "1.0.0" for sim in sims)
        assert took_over < 30
