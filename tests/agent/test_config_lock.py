"""Configuration loading and the one-agent-per-state-folder lock (with two real processes)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_agent.lock import AgentLockedError, StateDirLock
from device_agent.settings import AgentConfig
from edgeota_contract.errors import ContractError
from tests.agent.conftest import Keys, write_config


def test_agent_table_parsed_into_typed_settings(tmp_path: Path, keys: Keys) -> None:
    path = write_config(
        tmp_path, keys, "http://127.0.0.1:1", heartbeat_seconds=7, max_boot_attempts=4, download_rate_limit_bps=1000
    )
    cfg = AgentConfig.load(path)
    assert cfg.device_id == "dev-1"
    assert cfg.settings.heartbeat_seconds == 7.0
    assert cfg.settings.max_boot_attempts == 4
    assert cfg.settings.download_rate_limit_bps == 1000
    assert cfg.settings.state_dir == (tmp_path / "state").resolve()  # relative to the file
    assert cfg.release_keys.key_ids == [keys.release.key_id]
    assert cfg.server_keys.key_ids == [keys.server.key_id]


@pytest.mark.parametrize(
    ("agent", "needle"),
    [
        ({"heartbeat_seconds": -1}, "heartbeat_seconds"),
        ({"no_such_key": 1}, "no_such_key"),
        ({"trial_requests": 0, "trial_seconds": 0}, "both be 0"),
        ({"telemetry_feature_sample_rate": 0}, "telemetry_feature_sample_rate"),
        ({"telemetry_feature_sample_rate": 1.5}, "telemetry_feature_sample_rate"),
    ],
)
def test_bad_agent_settings_rejected(tmp_path: Path, keys: Keys, agent: dict[str, object], needle: str) -> None:
    path = write_config(tmp_path, keys, "http://127.0.0.1:1", **agent)
    with pytest.raises(ContractError, match=needle):
        AgentConfig.load(path)


def test_env_fills_unset_setting(tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEOTA_AGENT_CRASH_AT", "download")
    monkeypatch.setenv("EDGEOTA_AGENT_HEARTBEAT_SECONDS", "99")
    cfg = AgentConfig.load(write_config(tmp_path, keys, "http://127.0.0.1:1"))
    assert cfg.settings.crash_at == "download"
    assert cfg.settings.heartbeat_seconds == 5.0  # the file wins over the environment


def test_lock_refuses_second_holder_in_process(tmp_path: Path) -> None:
    first = StateDirLock(tmp_path)
    first.acquire()
    with pytest.raises(AgentLockedError, match="already uses state folder"):
        StateDirLock(tmp_path).acquire()
    first.release()
    again = StateDirLock(tmp_path)
    again.acquire()
    again.release()


@pytest.mark.integration
def test_second_agent_process_refuses_to_start(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, "http://127.0.0.1:1", mqtt_port=1)
    exe = [sys.executable, "-m", "edgeota.cli", "agent", "run", "--config", str(config)]
    first = subprocess.Popen(exe, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lock = tmp_path / "state" / "agent.lock"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (lock.exists() and lock.read_text().strip()):
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        second = subprocess.run(exe, capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"error: another edgeota agent (pid {first.pid})" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        first.wait(timeout=20)
    assert first.returncode == 0  # SIGTERM -> clean shutdown
