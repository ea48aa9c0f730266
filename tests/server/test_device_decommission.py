"""Device decommissioning through the API (both databases): credentials revoked, rollouts left, history kept."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from ota_server.broker_config import write_broker_config
from ota_server.context import ServerContext
from ota_server.engine import tick

from .conftest import AUTH, BundleFactory, make_token, upload
from .helpers import assignments, checkin, finish


def _provision(client: TestClient, device_id: str) -> dict[str, Any]:
    resp = client.post(
        "/api/v1/devices",
        json={"device_id": device_id, "hardware_profile": "x86-avx2", "labels": {"ring": "a"}},
        headers=AUTH,
    )
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


def _device_ids(client: TestClient, **params: str) -> list[str]:
    resp = client.get("/api/v1/devices", params=params, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return [d["device_id"] for d in resp.json()]


def _running_rollout(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> str:
    release = upload(client, make_bundle("1.0.0", "x86-avx2")).json()["release_id"]
    body = {
        "release_id": release,
        "selector": {"labels": {"ring": "a"}},
        "stages": [{"percent": 100, "soak_seconds": 0}],
        "gates": {"min_devices": 1, "max_failure_rate": 0.0, "min_count_for_failure_rate": 1},
        "start": True,
    }
    resp = client.post("/api/v1/rollouts", json=body, headers=AUTH)
    assert resp.status_code == 201, resp.text
    tick(ctx)
    rollout_id: str = resp.json()["rollout_id"]
    return rollout_id


def test_decommission_revokes_leaves_rollouts_hides_and_keeps_history(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    gone = _provision(client, "d0")
    _provision(client, "d1")
    rollout_id = _running_rollout(client, ctx, make_bundle)
    assert assignments(ctx, "d0") and assignments(ctx, "d1")  # both were sent the release
    device_auth = {"Authorization": f"Bearer {gone['token']}"}
    assert client.get("/api/v1/devices/d0/commands", headers=device_auth).status_code == 200

    operator = make_token(client, "operator")
    resp = client.post("/api/v1/devices/d0/decommission", json={"reason": "stolen"}, headers=operator)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["device_id"] == "d0" and out["left_rollouts"] == [rollout_id]
    assert len(out["cancelled_deployments"]) == 1

    # Its token no longer works; lists hide it unless asked for every device.
    assert client.get("/api/v1/devices/d0/commands", headers=device_auth).status_code == 401
    assert _device_ids(client) == ["d1"]
    assert _device_ids(client, all="true") == ["d0", "d1"]
    # Its history stays: the deployment is cancelled, not deleted.
    detail = client.get("/api/v1/devices/d0", headers=AUTH).json()
    assert detail["decommissioned_at"] == out["decommissioned_at"]
    assert [(d["state"], d["reason"]) for d in detail["deployments"]] == [("failed", "cancelled")]

    # While the broker still lets it in (until `broker config` runs again), its messages change nothing.
    assert checkin(ctx, "d0", "x86-avx2", assignments(ctx, "d0")[-1:]) == "unknown_device"
    assert client.get("/api/v1/devices/d0", headers=AUTH).json()["models"] == []

    # The rollout goes on without it: its cancelled deployment is no failure (max_failure_rate 0).
    status = client.get(f"/api/v1/rollouts/{rollout_id}", headers=AUTH).json()
    assert status["targets"] == 1
    finish(ctx, assignments(ctx, "d1")[-1])
    tick(ctx)
    assert client.get(f"/api/v1/rollouts/{rollout_id}", headers=AUTH).json()["state"] == "completed"

    # A new rollout never targets it; the audit log says who and why.
    release = status["release_id"]
    preview = client.post(
        "/api/v1/rollouts",
        json={"release_id": release, "selector": {"labels": {"ring": "a"}}, "dry_run": True},
        headers=AUTH,
    ).json()
    assert "d0" not in [d for s in preview["stages"] for d in s["devices"]]
    audit = client.get("/api/v1/audit", params={"entity_id": "d0"}, headers=AUTH).json()
    entries = [e for e in audit if e["action"] == "device.decommission"]
    assert len(entries) == 1 and entries[0]["reason"] == "stolen" and entries[0]["actor"] == "token:operator"


def test_decommissioned_device_leaves_the_broker_password_file(client: TestClient, ctx: ServerContext) -> None:
    _provision(client, "d0")
    _provision(client, "d1")
    assert client.post("/api/v1/devices/d0/decommission", headers=AUTH).status_code == 200
    out = ctx.settings.data_dir / "broker"
    write_broker_config(ctx.settings, out)
    users = [line.split(":", 1)[0] for line in (out / "passwd").read_text().splitlines()]
    assert users == ["d1"]


def test_decommission_rejections(client: TestClient) -> None:
    _provision(client, "d0")
    viewer = make_token(client, "viewer")
    resp = client.post("/api/v1/devices/d0/decommission", headers=viewer)
    assert resp.status_code == 403, resp.text
    assert _device_ids(client) == ["d0"]  # nothing changed
    resp = client.post("/api/v1/devices/nope/decommission", headers=AUTH)
    assert resp.status_code == 404 and "not found" in resp.json()["detail"]
    assert client.post("/api/v1/devices/d0/decommission", headers=AUTH).status_code == 200
    again = client.post("/api/v1/devices/d0/decommission", headers=AUTH)
    assert again.status_code == 409
    assert "decommissioned at" in again.json()["detail"]
