"""Server test fixtures: a fresh database per test on SQLite and PostgreSQL, keys, bundles, an app."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgeota_contract.bundle import create_bundle
from edgeota_contract.manifest import Lineage
from edgeota_contract.signing import SigningKey, write_keypair
from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.main import create_app

ADMIN = "admin-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
_counter = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database per test, on both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@dataclass
class Keys:
    release: SigningKey
    release_pub: Path
    other: SigningKey = field(default_factory=SigningKey.generate)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    key = SigningKey.generate()
    _, pub = write_keypair(tmp_path / "keys" / "release.pem", key)
    return Keys(key, pub)


def bundle_fields(version: str, profile: str, model: str = "digits") -> dict[str, Any]:
    major, minor, patch = (int(p) for p in version.split("."))
    return dict(
        model_name=model,
        version=version,
        release_counter=major * 1_000_000 + minor * 1_000 + patch,
        hardware_profile=profile,
        inputs=[{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, 2]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="fp32",
        metrics={"accuracy": 0.9},
        lineage=Lineage(
            source_model_sha256="a" * 64,
            packager_version="0.1.0",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            created_by="tests",
        ),
    )


BundleFactory = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, keys: Keys) -> BundleFactory:
    def make(
        version: str = "1.0.0",
        profile: str = "x86",
        key: SigningKey | None = None,
        model: str = "digits",
        reference: bytes = b'{"schema_version":1,"sample_count":0,"features":[]}',
    ) -> Path:
        n = next(_counter)
        path = tmp_path / "bundles" / f"{model}-{version}-{profile}-{n}.bundle.tar"
        payload = {
            "model.onnx": f"model {model} {version} {profile} {n}".encode() * 50,
            "reference_stats.json": reference,
            "test_vectors.npz": b"vectors",
            "model_card.md": b"# card\n",
        }
        create_bundle(path, payload, key or keys.release, **bundle_fields(version, profile, model))
        return path

    return make


@pytest.fixture
def settings(tmp_path: Path, db_url: str, keys: Keys) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        release_keys=[keys.release_pub],
        admin_token=ADMIN,
        mqtt_enabled=False,
        engine_enabled=False,
        max_bundle_bytes=200_000,
        public_url="http://testserver",
    )


@dataclass
class CapturePublisher:
    """Records commands instead of sending them over MQTT (unit/API tests only)."""

    sent: list[tuple[str, bytes]] = field(default_factory=list)

    def publish_command(self, device_id: str, payload: bytes) -> bool:
        self.sent.append((device_id, payload))
        return True


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings)
    app.state.ctx.publisher = CapturePublisher()
    with TestClient(app) as test_client:
        yield test_client
    app.state.ctx.engine.dispose()


@pytest.fixture
def ctx(client: TestClient) -> ServerContext:
    context: ServerContext = client.app.state.ctx  # type: ignore[attr-defined]
    return context


def upload(client: TestClient, path: Path, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        "/api/v1/bundles",
        content=path.read_bytes(),
        headers={**(headers or AUTH), "Content-Type": "application/octet-stream"},
    )


def make_token(client: TestClient, role: str) -> dict[str, str]:
    resp = client.post("/api/v1/tokens", json={"role": role, "name": role}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}
