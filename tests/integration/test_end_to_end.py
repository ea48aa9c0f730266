"""Issue 2's proof: one real update, end to end, on SQLite and on PostgreSQL.

A tiny digits classifier is trained here and packaged for one profile; the bundle is uploaded
to a real OTA server process; a real device agent process, connected to the real Mosquitto,
receives the signed assignment, downloads the bundle over HTTP, verifies both signatures,
swaps, runs the smoke test, commits and reports; the server's API then shows the device on
the new version. A second release then replaces the first the same way.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_harness import running_agent, running_server, wait_until

from edgeota_contract.bundle import read_manifest
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import load_private_key, write_keypair

PROFILE = "x86-avx2"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Keys, the trained model and two signed bundles (1.0.0 and 1.1.0) for one profile."""
    from packager.api import package_model
    from packager.examples.digits import build_digits_example
    from packager.request import PackageRequest

    root = tmp_path_factory.mktemp("e2e-build")
    priv, pub = write_keypair(root / "keys" / "release.pem")
    example = build_digits_example(root / "model", arch="mlp")
    out: dict[str, Any] = {"release_pub": pub, "release_key_id": load_private_key(priv).key_id}
    for version in ("1.0.0", "1.1.0"):
        report = package_model(
            PackageRequest(
                model=example.model_path,
                profiles=[PROFILE],
                calibration=example.calibration_path,
                eval_data=example.eval_path,
                key=priv,
                out_dir=root / f"dist-{version}",
                name="digits",
                version=version,
            )
        )
        result = report.results[PROFILE]
        assert result.ok, result
        out[version] = Path(result.bundle_path)
    return out


def _device(client: httpx.Client, device_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/devices/{device_id}")
    response.raise_for_status()
    return dict(response.json())


def _running_version(client: httpx.Client, device_id: str) -> str | None:
    models = _device(client, device_id).get("models") or []
    for model in models:
        if model.get("model_name") == "digits":
            return str(model.get("version"))
    return None


def _roll_out(client: httpx.Client, bundle: Path, device_id: str) -> dict[str, Any]:
    upload = client.post(
        "/api/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"}
    )
    assert upload.status_code == 201, upload.text
    release_id = upload.json()["release_id"]
    created = client.post(
        "/api/v1/rollouts",
        json={
            "release_id": release_id,
            "selector": {"device_ids": [device_id]},
            "strategy": "canary",
            "stages": [{"percent": 100, "soak_seconds": 0}],
            "on_failure": "rollback",
            "start": True,
        },
    )
    assert created.status_code in (200, 201), created.text
    return dict(created.json())


@pytest.mark.integration
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_package_publish_install_update(
    database: str, bundles: dict[str, Any], tmp_path: Path, mqtt_broker: Any, request: pytest.FixtureRequest
) -> None:
    db_url = f"sqlite:///{tmp_path / 'server.db'}" if database == "sqlite" else request.getfixturevalue("pg_url")
    with running_server(tmp_path / "server", db_url, mqtt_broker.port, [bundles["release_pub"]]) as server:
        client = server.client()

        # Bad input at the boundary: a tampered bundle is refused with a 4xx and nothing is stored.
        tampered = bytearray(bundles["1.0.0"].read_bytes())
        with tarfile.open(bundles["1.0.0"]) as tar:
            model_offset = tar.getmember("model.onnx").offset_data
        tampered[model_offset + 100] ^= 0xFF  # one byte inside the model, same length
        refused = client.post("/api/v1/bundles", content=bytes(tampered))
        assert 400 <= refused.status_code < 500, refused.text
        assert _release_list(client) == []

        provisioned = client.post("/api/v1/devices", json={"hardware_profile": PROFILE, "labels": {"site": "lab"}})
        assert provisioned.status_code == 201, provisioned.text
        device_id = provisioned.json()["device_id"]
        config = tmp_path / "device" / "agent.toml"
        config.parent.mkdir()
        prov = DeviceProvisioning.model_validate(tomllib.loads(provisioned.json()["agent_toml"]))
        prov.agent["state_dir"] = str(tmp_path / "device" / "state")
        prov.agent["trial_seconds"] = 3.0  # the health window; production default is longer
        config.write_text(prov.to_toml())

        with running_agent(config) as agent:
            wait_until(lambda: _device(client, device_id).get("online"), 60, "device online", proc=agent)
            assert _running_version(client, device_id) is None

            for version in ("1.0.0", "1.1.0"):
                _roll_out(client, bundles[version], device_id)
                wait_until(
                    lambda v=version: _running_version(client, device_id) == v,  # type: ignore[misc]
                    120,
                    f"device on {version}",
                    proc=agent,
                )

            # The agent's own view agrees with the server's.
            status = subprocess.run(
                [sys.executable, "-m", "edgeota.cli", "agent", "status", "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert status.returncode == 0, status.stderr
            assert "1.1.0" in status.stdout
            manifest, _ = read_manifest(bundles["1.1.0"])
            assert manifest.signing_key_id == bundles["release_key_id"]


def _release_list(client: httpx.Client) -> list[Any]:
    body = client.get("/api/v1/releases").json()
    return list(body["items"] if isinstance(body, dict) else body)
