"""Every 2xx answer of every operation in ``/openapi.json`` has a response schema that says something."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from edgeota_contract.signing import SigningKey, write_keypair
from ota_server.core.config import Settings
from ota_server.main import ROUTE_MODULES, create_app

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    tmp = tmp_path_factory.mktemp("openapi")
    _, pub = write_keypair(tmp / "release.pem", SigningKey.generate())
    return create_app(Settings(data_dir=tmp / "data", release_keys=[pub], mqtt_enabled=False, engine_enabled=False))


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    node: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def _describes_a_body(spec: dict[str, Any], schema: dict[str, Any]) -> bool:
    """A model (properties), a list of something described, a typed map, or raw bytes; never ``{}`` or a bare
    ``object`` (what an undeclared ``dict[str, Any]`` return becomes)."""
    schema = _resolve(spec, schema)
    kind = schema.get("type")
    if kind == "array":
        return _describes_a_body(spec, schema.get("items", {}))
    if kind == "object":
        if schema.get("properties"):
            return True
        extra = schema.get("additionalProperties")
        return isinstance(extra, dict) and _describes_a_body(spec, extra)
    if kind == "string":
        return schema.get("format") == "binary"
    return kind in ("integer", "number", "boolean")


def _missing(spec: dict[str, Any]) -> tuple[list[str], int]:
    """(what lacks a schema, how many operations were checked)."""
    missing: list[str] = []
    checked = 0
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            checked += 1
            ok = [code for code in op["responses"] if code.startswith("2")]
            if not ok:
                missing.append(f"{method.upper()} {path}: no 2xx answer")
            for code in ok:
                content = op["responses"][code].get("content") or {}
                if not content:
                    missing.append(f"{method.upper()} {path} {code}: no content")
                for media, body in content.items():
                    if not _describes_a_body(spec, body.get("schema") or {}):
                        missing.append(f"{method.upper()} {path} {code} {media}: no schema")
    return missing, checked


def _route_count() -> int:
    """Operations the API's routers declare (one per route and method)."""
    return sum(
        len(route.methods or ())
        for module in ROUTE_MODULES
        for route in module.router.routes
        if isinstance(route, APIRoute) and route.include_in_schema
    )


def test_every_2xx_answer_has_a_schema(app: FastAPI) -> None:
    spec = TestClient(app).get("/openapi.json").json()
    missing, checked = _missing(spec)
    assert missing == []
    assert checked == _route_count() >= 20


def test_a_route_without_a_response_model_is_found(app: FastAPI) -> None:
    """The check fails for an operation that declares nothing (so the test above can fail)."""
    spec = TestClient(app).get("/openapi.json").json()
    op = spec["paths"]["/api/v1/releases"]["get"]
    op["responses"]["200"]["content"]["application/json"]["schema"] = {}
    spec["paths"]["/api/v1/tokens"]["post"]["responses"]["201"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "additionalProperties": True,
    }
    missing, _ = _missing(spec)
    assert sorted(missing) == [
        "GET /api/v1/releases 200 application/json: no schema",
        "POST /api/v1/tokens 201 application/json: no schema",
    ]
