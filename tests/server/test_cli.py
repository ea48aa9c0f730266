"""The CLI over a real server process: tokens, releases, devices, rollouts, broker config, errors."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeota_contract.provisioning import DeviceProvisioning
from tests.conftest import Broker

from .conftest import ADMIN, BundleFactory, Keys
from .procs import EDGEOTA, ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'cli.db'}", keys, mqtt_broker)
    proc.start()
    try:
        yield proc
    finally:
        # SIGTERM: clean shutdown (uvicorn re-raises the signal once the app has stopped)
        assert proc.stop() in (0, -15)
        assert '"event": "server_stopped"' in proc.log.read_text()
        proc.http.close()


def run(server: ServerProcess, *args: str, token: str = ADMIN, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": token}
    result = subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)
    if ok:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_end_to_end(server: ServerProcess, make_bundle: BundleFactory, tmp_path: Path) -> None:
    rm = run(server, "server", "token", "create", "--role", "release_manager").stdout.strip()
    assert "." in rm
    bundles = [make_bundle("1.0.0", "x86"), make_bundle("1.0.0", "arm64")]
    out = run(server, "release", "publish", *map(str, bundles), token=rm).stdout
    assert out.count("digits 1.0.0") == 2
    listed = run(server, "release", "list", token=rm).stdout
    assert "digits" in listed and "arm64" in listed
    release_id = server.api("GET", "/api/v1/releases")[0]["release_id"]
    assert json.loads(run(server, "release", "show", release_id, "-o", "json", token=rm).stdout)["version"] == "1.0.0"

    agent = tmp_path / "agent.toml"
    run(
        server,
        "device",
        "provision",
        "--profile",
        "x86",
        "--label",
        "site=a",
        "--id",
        "cli-dev",
        "--out",
        str(agent),
        token=rm,
    )
    assert DeviceProvisioning.load(agent).device.id == "cli-dev" and agent.stat().st_mode & 0o777 == 0o600
    devices = json.loads(run(server, "device", "list", "--json", "--label", "site=a").stdout)
    assert [d["device_id"] for d in devices] == ["cli-dev"]
    assert json.loads(run(server, "device", "show", "cli-dev", "-o", "json").stdout)["hardware_profile"] == "x86"

    dry = json.loads(
        run(
            server,
            "rollout",
            "create",
            "--release",
            release_id,
            "--stage",
            "50%:10",
            "--stage",
            "100%",
            "--dry-run",
            "--output",
            "json",
            token=rm,
        ).stdout
    )
    assert dry["dry_run"] and dry["eligible"] == 1
    shown = run(server, "rollout", "create", "--release", release_id, "--dry-run", token=rm).stdout
    assert "Dry run (nothing stored)" in shown and "eligible devices" in shown  # a table by default
    rid = run(
        server,
        "rollout",
        "create",
        "--release",
        release_id,
        "--label",
        "site=a",
        "--max-concurrent",
        "2",
        "--max-error-rate",
        "0.1",
        "--window",
        "00:00-23:59",
        "--max-retries",
        "2",
        "--retry-backoff",
        "5",
        token=rm,
    ).stdout.strip()
    plan = server.api("GET", f"/api/v1/rollouts/{rid}")["plan"]
    assert plan["gates"]["max_concurrent"] == 2 and plan["windows"] == [{"start_minute": 0, "end_minute": 1439}]
    assert plan["max_retries"] == 2 and plan["retry_backoff_seconds"] == 5.0
    assert "running" in run(server, "rollout", "start", rid, token=rm).stdout
    assert "paused" in run(server, "rollout", "pause", rid, "--reason", "check").stdout
    assert "paused" in run(server, "rollout", "status", rid).stdout
    assert "aborted" in run(server, "rollout", "abort", rid).stdout
    watched = run(server, "rollout", "status", rid, "--watch", ok=False)
    assert watched.returncode == 4 and "aborted" in watched.stdout  # --watch: exit 4 for an aborted rollout

    broker_dir = tmp_path / "broker"
    env_db = {**os.environ, **{k: v for k, v in server.env.items() if k.startswith("EDGEOTA_SERVER_")}}
    done = subprocess.run(
        [EDGEOTA, "broker", "config", "--out", str(broker_dir)], env=env_db, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (broker_dir / "passwd").read_text().startswith("cli-dev:$7$")


def test_cli_errors_are_one_line(server: ServerProcess, tmp_path: Path) -> None:
    cases = [
        ("rollout", "start", "no-such-rollout"),
        ("device", "provision", "--profile", "x86", "--label", "novalue"),
        ("release", "publish", str(tmp_path / "missing.tar")),
        ("server", "token", "create", "--role", "emperor"),
        ("rollout", "create", "--release", "r", "--stage", "lots"),
        ("rollout", "create", "--release", "r", "--window", "22:00"),
    ]
    for args in cases:
        result = run(server, *args, ok=False)
        assert result.returncode != 0, args
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, (args, result.stderr)
    denied = run(server, "device", "list", token="wrong.token", ok=False)
    assert denied.returncode != 0 and "401" in denied.stderr
