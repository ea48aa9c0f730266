"""The event-driven agent: an idle agent keeps one sleeping thread, reads state without copies, asks
SQLite nothing, rewrites nothing unchanged; update work starts a worker on demand; progress reports
go out as each step completes; the downloaded archive is hashed once, by the verification pass."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from device_agent.agent import Agent
from device_agent.settings import AgentConfig
from device_agent.store import StateStore
from device_agent.telemetry.spool import Spool
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker


def _threads(agent: Agent) -> set[str]:
    prefix = f"agent-{agent.device_id}-"
    return {t.name.removeprefix(prefix) for t in threading.enumerate() if t.name.startswith(prefix)}


def _wait(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    event = threading.Event()
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return True
        event.wait(0.05)
    return predicate()


def test_idle_agent_has_one_thread_and_update_work_starts_a_worker(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    config = AgentConfig.load(write_config(tmp_path, keys, server.url, device_id="loop-1"))
    with Agent(config, connect=False) as agent:
        assert _wait(lambda: _threads(agent) == {"ticker"})  # the start-up pass found nothing to do
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), device_id="loop-1"), keys.server))
        assert agent.wait_idle(30)
        assert agent.state.active() is not None and agent.state.active().version == "1.0.0"  # type: ignore[union-attr]
        assert _wait(lambda: _threads(agent) == {"ticker"})  # the worker ended with its work
        # a second update starts a new worker
        agent.handle_command(
            signed(assignment(publish_bundle("1.1.0"), device_id="loop-1", deployment_id="dep-2"), keys.server)
        )
        assert agent.wait_idle(30)
        assert agent.state.active().version == "1.1.0"  # type: ignore[union-attr]
    assert _threads(agent) == set()


def test_state_reads_share_one_snapshot_and_unchanged_updates_write_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    with store.update() as st:
        st.remember_nonce("n1")
    first = store.state
    assert store.state is first  # no copy per read
    inode = store.path.stat().st_ino
    with store.update() as st:
        st.remember_nonce("n1")  # already there: nothing changes
    assert store.path.stat().st_ino == inode and store.state is first
    with store.update() as st:
        st.remember_nonce("n2")
    assert store.path.stat().st_ino != inode  # a real change is written (temp file renamed over)
    assert store.state is not first and first.used_nonces == ["n1"]  # the old snapshot never changes
    assert StateStore(tmp_path).state.used_nonces == ["n1", "n2"]
    with pytest.raises(RuntimeError), store.update() as st:
        st.remember_nonce("n3")
        raise RuntimeError("abandoned")
    assert store.state.used_nonces == ["n1", "n2"]


def test_spool_counts_are_kept_in_memory_and_match_the_database(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "t.sqlite", max_windows=3)
    assert len(spool) == 0 and spool.oldest(10) == [] and spool.ack(["x"]) == 0
    for i in range(5):
        spool.add(f"m{i}", b"p")
    spool.add("m4", b"p")  # a duplicate is not stored twice
    assert (len(spool), spool.dropped) == (3, 2)
    assert spool.ack(["m2", "m3", "nope"]) == 2 and len(spool) == 1
    spool.close()
    again = Spool(tmp_path / "t.sqlite", max_windows=3)
    assert (len(again), again.dropped, [m for m, _ in again.oldest(10)]) == (1, 2, ["m4"])
    again.close()


def test_archive_is_hashed_once_while_it_is_downloaded(
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The download hashes the bytes as it writes them; no later step reads the archive again to hash it."""
    import device_agent.update.repair as repair
    import edgeota_contract.bundle as bundle

    def no_second_read(path: Path) -> str:
        raise AssertionError(f"{path} hashed a second time")

    monkeypatch.setattr(bundle, "sha256_file", no_second_read)
    monkeypatch.setattr(repair, "sha256_file", no_second_read)
    config = AgentConfig.load(write_config(tmp_path, keys, server.url, device_id="once-1"))
    with Agent(config, connect=False) as agent:
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), device_id="once-1"), keys.server))
        assert agent.wait_idle(30)
        assert [r["state"] for r in agent.state.outbox][-1] == "committed"


@pytest.mark.integration
def test_progress_reports_go_out_while_the_trial_runs(
    tmp_path: Path, keys: Keys, server: BundleServer, mqtt_broker: Broker, publish_bundle: Callable[..., BundleRef]
) -> None:
    """The retry interval is long: the trial report must still arrive before the deployment ends."""
    device_id = f"prog-{uuid.uuid4().hex[:8]}"
    config = write_config(
        tmp_path,
        keys,
        server.url,
        device_id=device_id,
        mqtt_port=mqtt_broker.port,
        report_retry_seconds=600.0,
        trial_seconds=4.0,
        trial_probe_interval_seconds=0.2,
    )
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    agent = Agent(AgentConfig.load(config))
    try:
        agent.start()
        assert agent.transport is not None and agent.transport.wait_connected(15)
        rec.publish_cmd(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
        assert rec.wait_for(lambda: any(p.get("state") == "trial" for p in rec.of("status")), 30)
        dep = agent.state.deployment
        assert dep is not None and dep.step.value == "trial"  # still in trial: the report was not held back
        assert rec.wait_for(lambda: any(p.get("state") == "committed" for p in rec.of("status")), 30)
    finally:
        agent.stop()
        rec.close()


def test_a_command_delivered_after_stop_is_ignored(tmp_path: Path, keys: Keys, server: BundleServer) -> None:
    from datetime import UTC, datetime, timedelta

    from edgeota_contract.messages import Ack

    config = AgentConfig.load(write_config(tmp_path, keys, server.url, device_id="late-1"))
    agent = Agent(config, connect=False)
    agent.start()
    spool = agent.outbox.spool
    spool.add("w1", b"{}")
    agent.stop()
    now = datetime.now(UTC)
    ack = Ack(device_id="late-1", msg_ids=["w1"], issued_at=now, expires_at=now + timedelta(minutes=5))
    agent.handle_command(signed(ack, keys.server))  # no error, nothing done
    assert spool.ack(["w1"]) == 0 and spool.oldest(10) == []
    reopened = Spool(tmp_path / "state" / "telemetry.sqlite", max_windows=10)
    assert [m for m, _ in reopened.oldest(10)] == ["w1"]  # still spooled: re-sent after the next start
    reopened.close()
