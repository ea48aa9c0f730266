"""``edgeota agent run|apply|status`` as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker

EDGEOTA = [sys.executable, "-m", "edgeota.cli"]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}


@pytest.mark.integration
def test_run_installs_over_mqtt_and_stops_cleanly(
    tmp_path: Path, keys: Keys, server: BundleServer, mqtt_broker: Broker, publish_bundle: Callable[..., BundleRef]
) -> None:
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    config = write_config(tmp_path, keys, server.url, device_id=device_id, mqtt_port=mqtt_broker.port)
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    proc = subprocess.Popen(
        [*EDGEOTA, "agent", "run", "--config", str(config)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert rec.wait_for(lambda: any(p.get("online") for p in rec.of("presence")), 30)
        rec.publish_cmd(signed(assignment(publish_bundle("1.0.0"), device_id=device_id), keys.server))
        assert rec.wait_for(lambda: any(p.get("state") == "committed" for p in rec.of("status")), 30)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert rec.wait_for(lambda: rec.of("presence")[-1].get("online") is False)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rec.close()
    status = subprocess.run(
        [*EDGEOTA, "agent", "status", "--config", str(config)], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stderr
    assert "model:          digits" in status.stdout
    assert "version:        1.0.0" in status.stdout
    assert "last deployment: dep-1 digits 1.0.0 -> committed (ok)" in status.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["agent", "status", "--config", "/nonexistent/agent.toml"], "error: cannot read /nonexistent/agent.toml"),
        (["agent", "apply", "/nonexistent/cmd.json", "--config", "CONFIG"], "error: cannot read /nonexistent/cmd.json"),
        (["agent", "run", "--config", "BADCONFIG"], "error: [agent] heartbeat_seconds"),
        (["agent", "run", "--config", "UNWRITABLE"], "error: cannot use state folder"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path: Path, keys: Keys, args: list[str], needle: str) -> None:
    config = write_config(tmp_path / "ok", keys, "http://127.0.0.1:1")
    bad = write_config(tmp_path / "bad", keys, "http://127.0.0.1:1", heartbeat_seconds=0)
    (tmp_path / "file").write_text("not a folder")
    unwritable = write_config(tmp_path / "nw", keys, "http://127.0.0.1:1", state_dir=str(tmp_path / "file" / "state"))
    named = {"CONFIG": config, "BADCONFIG": bad, "UNWRITABLE": unwritable}
    args = [str(named[a]) if a in named else a for a in args]
    result = subprocess.run([*EDGEOTA, *args], env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_status_of_fresh_device(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, "http://127.0.0.1:1")
    result = subprocess.run(
        [*EDGEOTA, "agent", "status", "--config", str(config)], env=_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "active slot:    -" in result.stdout and "(none installed)" in result.stdout
