"""One-line refusals that leave nothing half done, over a real server process: `device provision --out`, unknown
profiles, rollouts without targets, `broker config` without the server's data, and the URL `server run` advertises."""

from __future__ import annotations

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
    proc = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'refusals.db'}", keys, mqtt_broker)
    with proc.running():
        yield proc


def edgeota(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)


def client_env(server: ServerProcess) -> dict[str, str]:
    return {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN}


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr.strip()


def device_ids(server: ServerProcess) -> list[str]:
    return [d["device_id"] for d in server.api("GET", "/api/v1/devices")]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ------------------------------------------------------------------ device provision --out


def test_an_unwritable_out_path_registers_nothing(server: ServerProcess, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    for out in (blocker / "agent.toml", tmp_path):  # under a file; a folder itself
        result = edgeota(
            "device", "provision", "--profile", "x86-avx2", "--id", "never", "--out", str(out), env=client_env(server)
        )
        assert one_line_error(result).startswith(f"error: cannot write {out}: "), result.stderr
    assert device_ids(server) == []
    assert blocker.read_text() == "not a folder\n"


def test_a_refused_registration_writes_nothing(server: ServerProcess, tmp_path: Path) -> None:
    # a new folder for the file: not even the folder stays behind
    out = tmp_path / "new" / "deeper" / "agent.toml"
    result = edgeota(
        "device", "provision", "--profile", "rpi-4", "--id", "typo", "--out", str(out), env=client_env(server)
    )
    assert "unknown hardware profile 'rpi-4'" in one_line_error(result)
    assert not (tmp_path / "new").exists()
    assert device_ids(server) == []

    # an existing file stays as it was when the server refuses (the id is taken)
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "agent.toml").write_text("old credentials\n")
    first = edgeota("device", "provision", "--profile", "x86-avx2", "--id", "taken", env=client_env(server))
    assert first.returncode == 0, first.stderr
    again = edgeota(
        "device",
        "provision",
        "--profile",
        "x86-avx2",
        "--id",
        "taken",
        "--out",
        str(kept / "agent.toml"),
        env=client_env(server),
    )
    assert "device taken already exists" in one_line_error(again)
    assert leftovers(kept) == ["agent.toml"] and (kept / "agent.toml").read_text() == "old credentials\n"


def test_provision_out_writes_the_file_once_registered(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "fresh" / "agent.toml"
    result = edgeota(
        "device", "provision", "--profile", "x86-avx2", "--id", "ok-1", "--out", str(out), env=client_env(server)
    )
    assert result.returncode == 0, result.stderr
    assert DeviceProvisioning.load(out).device.id == "ok-1" and out.stat().st_mode & 0o777 == 0o600
    assert leftovers(out.parent) == ["agent.toml"]  # no temporary file left
    assert device_ids(server) == ["ok-1"]


# ------------------------------------------------------------------ rollouts without targets


def test_a_rollout_without_targets_needs_allow_empty(
    server: ServerProcess, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    env = client_env(server)
    assert edgeota("release", "publish", str(make_bundle("1.0.0", "x86-avx2")), env=env).returncode == 0
    release_id = server.api("GET", "/api/v1/releases")[0]["release_id"]
    refused = edgeota("rollout", "create", "--release", release_id, "--label", "site=nowhere", "--start", env=env)
    assert "the selection targets no device" in one_line_error(refused)
    assert server.api("GET", "/api/v1/rollouts") == []
    made = edgeota("rollout", "create", "--release", release_id, "--label", "site=nowhere", "--allow-empty", env=env)
    assert made.returncode == 0, made.stderr
    assert [r["rollout_id"] for r in server.api("GET", "/api/v1/rollouts")] == [made.stdout.strip()]


# ------------------------------------------------------------------ server run --port


def test_server_run_port_sets_the_advertised_url(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> None:
    proc = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'url.db'}", keys, mqtt_broker)
    del proc.env["EDGEOTA_SERVER_PUBLIC_URL"]
    with proc.running():
        toml = proc.api("POST", "/api/v1/devices", json={"device_id": "u1", "hardware_profile": "x86-avx2"})
    (tmp_path / "u1.toml").write_text(toml["agent_toml"])
    assert DeviceProvisioning.load(tmp_path / "u1.toml").server.url == f"http://127.0.0.1:{proc.port}"


# ------------------------------------------------------------------ broker config


def test_broker_config_without_the_servers_data_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_SERVER_")}
    env |= {"EDGEOTA_SERVER_DATA_DIR": str(missing), "EDGEOTA_SERVER_MQTT_USERNAME": "srv"}
    env["EDGEOTA_SERVER_MQTT_PASSWORD"] = "srv-password"
    result = edgeota("broker", "config", "--out", str(tmp_path / "broker"), env=env)
    assert one_line_error(result).startswith(f"error: no server database: the data folder {missing} does not exist")
    assert not missing.exists() and not (tmp_path / "broker").exists()
    for command in ("status", "refresh"):  # the TUF commands work on the same data folder
        result = edgeota("server", "tuf", command, env=env)
        assert one_line_error(result).startswith(f"error: no TUF repository at {missing / 'tuf'}")
        assert not missing.exists()
    # an explicit SQLite URL whose file is missing: the same, naming the file
    env["EDGEOTA_SERVER_DATABASE_URL"] = f"sqlite:///{tmp_path / 'gone.db'}"
    result = edgeota("broker", "config", "--out", str(tmp_path / "broker"), env=env)
    assert f"{tmp_path / 'gone.db'} does not exist" in one_line_error(result)
    assert not (tmp_path / "gone.db").exists()


def test_broker_config_warns_when_the_server_has_no_broker_user(server: ServerProcess, tmp_path: Path) -> None:
    env = {**os.environ, **{k: v for k, v in server.env.items() if k.startswith("EDGEOTA_SERVER_")}}
    env.pop("EDGEOTA_SERVER_MQTT_USERNAME", None)
    env.pop("EDGEOTA_SERVER_MQTT_PASSWORD", None)
    result = edgeota("broker", "config", "--out", str(tmp_path / "b1"), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: no server user is configured (mqtt_username")
    assert "turns anonymous access off" in result.stderr
    assert (tmp_path / "b1" / "edgeota.conf").read_text().startswith("allow_anonymous false")

    env["EDGEOTA_SERVER_MQTT_USERNAME"] = "srv"
    result = edgeota("broker", "config", "--out", str(tmp_path / "b2"), env=env)
    assert result.returncode == 0 and "warning: server user 'srv' has no password" in result.stderr

    env["EDGEOTA_SERVER_MQTT_PASSWORD"] = "srv-password"
    result = edgeota("broker", "config", "--out", str(tmp_path / "b3"), env=env)
    assert result.returncode == 0 and result.stderr == ""
    assert (tmp_path / "b3" / "passwd").read_text().startswith("srv:$7$")
