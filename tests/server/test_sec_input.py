"""Text a database cannot store (NUL, lone UTF-16 surrogates, bytes that are not UTF-8) on any input gives a
4xx problem answer, never a 500, on SQLite and on PostgreSQL.

Every string query and path parameter of every operation in the OpenAPI document is tried with each kind
of bad text, then JSON bodies that carry it in a string field and in a key.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgeota_contract.messages import CheckIn
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext

from .conftest import AUTH
from .helpers import deliver

# As they travel in a URL (percent-encoded) and inside JSON text (escaped).
BAD_IN_URL = {"nul": "%00", "nul_inside": "ab%00cd", "surrogate": "%ED%A0%80", "not_utf8": "%FF%FE"}
JSON = {**AUTH, "Content-Type": "application/json"}
BAD_IN_JSON = {"nul": "\\u0000", "nul_inside": "ab\\u0000cd", "surrogate": "\\ud800"}


def _string_params(client: TestClient) -> list[tuple[str, str, str, str]]:
    """(method, path template, where, name) of every string query or path parameter."""
    found = []
    for path, item in client.get("/openapi.json").json()["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                schema = param.get("schema", {})
                kinds = {schema.get("type")} | {s.get("type") for s in schema.get("anyOf", [])}
                if "string" in kinds and param["in"] in ("query", "path"):
                    found.append((method.upper(), path, param["in"], param["name"]))
    return found


def _fill(path: str, bad: str | None = None, name: str | None = None) -> str:
    """The path with every ``{param}`` replaced: ``name`` by ``bad``, the others by a harmless value."""
    return re.sub(r"\{([^}]+)\}", lambda m: bad if m.group(1) == name and bad is not None else "x1", path)


def _assert_refused(resp: Any, what: str) -> None:
    assert 400 <= resp.status_code < 500, f"{what}: {resp.status_code} {resp.text[:300]}"


@pytest.mark.parametrize("kind", sorted(BAD_IN_URL))
def test_unstorable_text_in_any_query_or_path_parameter_is_a_4xx(client: TestClient, kind: str) -> None:
    params = _string_params(client)
    assert len(params) >= 10  # the walk really covers the API
    bad = BAD_IN_URL[kind]
    for method, path, where, name in params:
        url = f"{_fill(path)}?{name}={bad}" if where == "query" else _fill(path, bad, name)
        resp = client.request(method, url, headers=AUTH)
        _assert_refused(resp, f"{method} {url}")
        if where == "query" or kind != "not_utf8":
            assert resp.headers["content-type"].startswith("application/problem+json"), url


def test_the_reported_cases(client: TestClient) -> None:
    for url in ("/api/v1/releases?model_name=%00", "/api/v1/audit?actor=%00", "/api/v1/devices?profile=%00"):
        resp = client.get(url, headers=AUTH)
        assert resp.status_code == 422, (url, resp.text)
        assert "text" in resp.json()["detail"]
    resp = client.post("/api/v1/tokens", content=b'{"role": "viewer", "name": "a\\u0000b"}', headers=JSON)
    assert resp.status_code == 422, resp.text
    # The same inputs without the bad character are served.
    assert client.get("/api/v1/releases?model_name=digits", headers=AUTH).status_code == 200
    assert client.post("/api/v1/tokens", json={"role": "viewer", "name": "ab"}, headers=AUTH).status_code == 201


BODIES: list[tuple[str, str, str]] = [
    # (method, path, JSON body with BAD where the bad text goes)
    ("POST", "/api/v1/tokens", '{"role": "viewer", "name": "BAD"}'),
    ("POST", "/api/v1/devices", '{"hardware_profile": "x86", "labels": {"site": "BAD"}}'),
    ("POST", "/api/v1/devices", '{"hardware_profile": "x86", "labels": {"BAD": "v"}}'),
    ("POST", "/api/v1/devices", '{"device_id": "BAD", "hardware_profile": "x86"}'),
    ("POST", "/api/v1/rollouts", '{"release_id": "BAD", "selector": {}}'),
    ("POST", "/api/v1/rollouts", '{"release_id": "r1", "selector": {"labels": {"site": "BAD"}}}'),
]


@pytest.mark.parametrize("kind", sorted(BAD_IN_JSON))
@pytest.mark.parametrize(("method", "path", "body"), BODIES)
def test_unstorable_text_in_a_json_body_is_a_4xx(
    client: TestClient, kind: str, method: str, path: str, body: str
) -> None:
    raw = body.replace("BAD", BAD_IN_JSON[kind]).encode()
    json.loads(raw)  # valid JSON: the bad text is inside a string
    resp = client.request(method, path, content=raw, headers=JSON)
    _assert_refused(resp, f"{method} {path} {raw!r}")


def test_an_escaped_backslash_before_u0000_is_ordinary_text(client: TestClient) -> None:
    """``\\\\u0000`` in JSON is a backslash followed by "u0000": storable, so accepted."""
    resp = client.post("/api/v1/tokens", content=b'{"role": "viewer", "name": "a\\\\u0000"}', headers=JSON)
    assert resp.status_code == 201, resp.text


@pytest.mark.parametrize("kind", sorted(BAD_IN_JSON))
def test_unstorable_text_in_a_device_message_is_malformed_and_ingest_goes_on(
    client: TestClient, ctx: ServerContext, kind: str
) -> None:
    """The same holds for what devices send over MQTT: refused as malformed (counted), never an error."""
    client.post("/api/v1/devices", json={"device_id": "nul-dev", "hardware_profile": "x86"}, headers=AUTH)
    topic = device_topic("nul-dev", Channel.CHECKIN)
    good = CheckIn(boot_id="b1", seq=1, hardware_profile="x86", agent_version="1.0").model_dump_json()
    bad = good.replace('"agent_version":"1.0"', f'"agent_version":"1{BAD_IN_JSON[kind]}"')
    assert bad != good
    assert deliver(ctx, topic, bad.encode()) == "malformed"
    assert ctx.metrics.snapshot().get("ingest_error", 0) == 0
    assert deliver(ctx, topic, good.encode()) == "ok"
