"""Provisioning (agent.toml from settings) and the device inventory."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import TrustedKeys, load_public_key
from ota_server.context import ServerContext
from ota_server.models import Device, utcnow

from .conftest import AUTH, Keys


def test_provision_returns_credentials_and_agent_toml(
    client: TestClient, ctx: ServerContext, keys: Keys, tmp_path: Path
) -> None:
    resp = client.post(
        "/api/v1/devices",
        json={"device_id": "cam-01", "hardware_profile": "rpi4", "labels": {"site": "north"}},
        headers=AUTH,
    )
    assert resp.status_code == 201, resp.text
    out = resp.json()
    assert out["device_id"] == out["mqtt_username"] == "cam-01"
    toml = tmp_path / "agent.toml"
    toml.write_text(out["agent_toml"])
    prov = DeviceProvisioning.load(toml)
    assert prov.device.id == "cam-01" and prov.device.hardware_profile == "rpi4"
    assert prov.server.url == "http://testserver" and prov.server.token == out["token"]
    assert (prov.mqtt.username, prov.mqtt.password) == ("cam-01", out["mqtt_password"])
    assert TrustedKeys.from_pems(prov.trust.release_keys).key_ids == [keys.release.key_id]
    server_pub = load_public_key(ctx.settings.server_public_key_path)
    assert TrustedKeys.from_pems(prov.trust.server_keys).key_ids == TrustedKeys([server_pub]).key_ids
    with ctx.sessions() as session:
        row = session.get(Device, "cam-01")
        assert row is not None and row.mqtt_password_hash.startswith("$7$")
        assert out["mqtt_password"] not in row.mqtt_password_hash and out["token"] not in row.token_hash
    dup = client.post("/api/v1/devices", json={"device_id": "cam-01", "hardware_profile": "rpi4"}, headers=AUTH)
    assert dup.status_code == 409


def test_inventory_filters_and_detail(client: TestClient, ctx: ServerContext) -> None:
    for dev_id, profile, labels in [
        ("a1", "x86", {"site": "n", "tier": "1"}),
        ("a2", "x86", {"site": "s"}),
        ("b1", "arm64", {"site": "n"}),
    ]:
        client.post(
            "/api/v1/devices", json={"device_id": dev_id, "hardware_profile": profile, "labels": labels}, headers=AUTH
        )
    with ctx.sessions() as session, session.begin():
        dev = session.get(Device, "a2")
        assert dev is not None
        dev.presence_online, dev.last_seen = True, utcnow()
        stale = session.get(Device, "b1")
        assert stale is not None
        stale.presence_online, stale.last_seen = True, utcnow() - timedelta(hours=2)

    def ids(**params: str) -> list[str]:
        return [d["device_id"] for d in client.get("/api/v1/devices", params=params, headers=AUTH).json()]

    assert ids() == ["a1", "a2", "b1"]
    assert ids(profile="x86") == ["a1", "a2"]
    assert ids(label="site=n") == ["a1", "b1"]
    assert ids(label="site=n,tier=1") == ["a1"]
    assert ids(online="true") == ["a2"]  # b1's heartbeat is older than the timeout
    assert ids(online="false") == ["a1", "b1"]
    detail = client.get("/api/v1/devices/a1", headers=AUTH).json()
    assert detail["labels"] == {"site": "n", "tier": "1"} and detail["models"] == [] and detail["deployments"] == []
    assert detail["online"] is False and detail["last_seen"] is None
    assert client.get("/api/v1/devices/zz", headers=AUTH).status_code == 404


def test_provision_refused_without_release_keys(client: TestClient, ctx: ServerContext) -> None:
    ctx.release_key_pems.clear()
    resp = client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=AUTH)
    assert resp.status_code == 409 and "RELEASE_KEYS" in resp.json()["detail"]
