"""Roles, token storage, problem-details errors and the audit log."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ota_server.context import ServerContext
from ota_server.models import ApiToken, AuditEntry

from .conftest import AUTH, make_token

PROBLEM = "application/problem+json"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/devices"),
        ("get", "/api/v1/releases"),
        ("get", "/api/v1/rollouts"),
        ("get", "/api/v1/audit"),
        ("post", "/api/v1/tokens"),
        ("post", "/api/v1/devices"),
        ("post", "/api/v1/bundles"),
        ("post", "/api/v1/rollouts"),
        ("get", "/api/v1/artifacts/" + "0" * 64),
    ],
)
def test_unauthenticated_calls_are_refused(client: TestClient, method: str, path: str) -> None:
    resp = client.request(method, path)
    assert resp.status_code == 401
    assert resp.headers["content-type"] == PROBLEM
    assert resp.json()["status"] == 401 and resp.json()["instance"] == path
    bad = client.request(method, path, headers={"Authorization": "Bearer not.a-valid-token"})
    assert bad.status_code == 401


def test_under_privileged_calls_are_refused(client: TestClient) -> None:
    viewer = make_token(client, "viewer")
    operator = make_token(client, "operator")
    assert client.get("/api/v1/devices", headers=viewer).status_code == 200
    assert client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=viewer).status_code == 403
    assert client.get("/api/v1/audit", headers=viewer).status_code == 403
    assert client.post("/api/v1/tokens", json={"role": "admin"}, headers=operator).status_code == 403
    resp = client.post(
        "/api/v1/bundles", content=b"x", headers={**operator, "Content-Type": "application/octet-stream"}
    )
    assert resp.status_code == 403 and resp.headers["content-type"] == PROBLEM
    assert client.post("/api/v1/rollouts", json={"release_id": "r"}, headers=operator).status_code == 403
    assert client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=operator).status_code == 201


def test_device_tokens_only_download(client: TestClient) -> None:
    dev = client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=AUTH).json()
    device_auth = {"Authorization": f"Bearer {dev['token']}"}
    assert client.get("/api/v1/devices", headers=device_auth).status_code == 403
    assert client.get("/api/v1/artifacts/" + "0" * 64, headers=device_auth).status_code == 404
    forged = dev["token"][:-2] + ("AA" if not dev["token"].endswith("AA") else "BB")
    assert client.get("/api/v1/artifacts/" + "0" * 64, headers={"Authorization": f"Bearer {forged}"}).status_code == 401


def test_tokens_are_stored_hashed(client: TestClient, ctx: ServerContext) -> None:
    header = make_token(client, "release_manager")
    plaintext = header["Authorization"].split()[1]
    token_id, secret = plaintext.rsplit(".", 1)
    with ctx.sessions() as session:
        row = session.get(ApiToken, token_id)
        assert row is not None and row.role == "release_manager"
        assert secret not in row.secret_hash and len(row.secret_hash) == 64


def test_bad_input_gives_problem_details_not_500(client: TestClient) -> None:
    cases = [
        client.post("/api/v1/tokens", json={"role": "emperor"}, headers=AUTH),
        client.post("/api/v1/tokens", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}),
        client.post("/api/v1/devices", json={"hardware_profile": "x86", "labels": {"a": 1}}, headers=AUTH),
        client.post("/api/v1/devices", json={"hardware_profile": "bad/profile"}, headers=AUTH),
        client.post("/api/v1/devices", json={"hardware_profile": "x86", "extra": 1}, headers=AUTH),
        client.get("/api/v1/devices", params={"label": "novalue"}, headers=AUTH),
        client.get("/api/v1/devices/bad%2Fid", headers=AUTH),
        client.get("/api/v1/audit", params={"limit": -1}, headers=AUTH),
        client.get("/api/v1/audit", params={"since": "yesterday"}, headers=AUTH),
        client.post(
            "/api/v1/rollouts", json={"release_id": "x", "stages": [{"percent": 10, "count": 2}]}, headers=AUTH
        ),
        client.post("/api/v1/rollouts", json={"release_id": "x", "stages": []}, headers=AUTH),
        client.post("/api/v1/rollouts/abc/explode", headers=AUTH),
    ]
    for resp in cases:
        assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code)
        assert resp.headers["content-type"] == PROBLEM
        assert resp.json()["detail"]


def test_audit_log_records_changes_and_filters(client: TestClient, ctx: ServerContext) -> None:
    client.post(
        "/api/v1/devices", json={"device_id": "aud-1", "hardware_profile": "x86", "labels": {"k": "v"}}, headers=AUTH
    )
    make_token(client, "viewer")
    entries = client.get("/api/v1/audit", headers=AUTH).json()
    actions = [e["action"] for e in entries]
    assert actions == ["device.provision", "token.create"]
    prov = entries[0]
    assert prov["actor"] == "bootstrap-admin" and prov["entity_id"] == "aud-1"
    assert prov["before"] is None and prov["after"]["labels"] == {"k": "v"} and prov["at"]
    only = client.get("/api/v1/audit", params={"action": "token.create"}, headers=AUTH).json()
    assert [e["action"] for e in only] == ["token.create"]
    assert client.get("/api/v1/audit", params={"entity_id": "aud-1", "entity_type": "device"}, headers=AUTH).json()
    assert client.get("/api/v1/audit", params={"actor": "someone-else"}, headers=AUTH).json() == []
    with ctx.sessions() as session:
        assert len(list(session.scalars(select(AuditEntry)))) == 2
