"""Fixtures for the agent tests: keys, a bundle HTTP server, provisioning files and signed assignments."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeota_contract.messages import Assignment, sign_command
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import SigningKey
from tests.agent.bundles import make_bundle
from tests.agent.http_server import BundleServer

TOKEN = "device-token-0123456789"
PROFILE = "x86_64-avx2"
FAST_AGENT = {
    # These tests count the requests their fake server sees; the tests of the check turn it on themselves.
    "server_check_seconds": 0,
    "trial_seconds": 0.3,
    "trial_requests": 0,
    "trial_probe_interval_seconds": 0.05,
    "download_backoff_seconds": 0.01,
    "download_backoff_max_seconds": 0.05,
    "download_retries": 2,
    "download_stall_seconds": 2.0,
    "download_timeout_seconds": 20.0,
    "report_retry_seconds": 0.5,
    "heartbeat_seconds": 5.0,
    "telemetry_window_seconds": 1.0,
    "disk_margin_bytes": 0,
    # the shared CI box can be very loaded: the previous-model latency rule is tested as a pure function
    # (test_machine.py); here its absolute slack is wide so scheduler noise cannot roll back a good model
    "health_latency_slack_ms": 250.0,
    "log_level": "WARNING",
}


@dataclass
class Keys:
    release: SigningKey
    server: SigningKey


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(SigningKey.generate(), SigningKey.generate())


@pytest.fixture(params=[True, False], ids=["c-path", "python-path"])
def native(request: pytest.FixtureRequest) -> bool:
    """Telemetry tests run on both request paths: the C one (built by ``make venv``) and pure Python."""
    return bool(request.param)


@pytest.fixture
def server() -> Iterator[BundleServer]:
    srv = BundleServer(token=TOKEN).start()
    yield srv
    srv.stop()


@pytest.fixture
def open_server() -> Iterator[BundleServer]:
    """A bundle/metadata server that asks for no token (the TUF repository is public)."""
    srv = BundleServer(token=None).start()
    yield srv
    srv.stop()


@dataclass
class BundleRef:
    path: Path
    sha256: str
    version: str
    size: int
    url: str
    model_name: str = "digits"


@pytest.fixture
def publish_bundle(tmp_path: Path, keys: Keys, server: BundleServer) -> Callable[..., BundleRef]:
    """Build a bundle and serve it: ``publish_bundle(version="1.0.0", mode="ok", **make_bundle_kwargs)``."""

    def make(
        version: str = "1.0.0",
        mode: str = "ok",
        serve_kwargs: dict[str, Any] | None = None,
        key: SigningKey | None = None,
        **kwargs: Any,
    ) -> BundleRef:
        out = tmp_path / "bundles" / f"{version}-{len(server.files)}.bundle.tar"
        out.parent.mkdir(exist_ok=True)
        path, sha = make_bundle(out, key or keys.release, version=version, **kwargs)
        url = f"/api/v1/artifacts/{sha}-{len(server.files)}"
        server.add(url, path.read_bytes(), mode=mode, **(serve_kwargs or {}))
        return BundleRef(path, sha, version, path.stat().st_size, url)

    return make


def write_config(
    folder: Path,
    keys: Keys,
    server_url: str,
    *,
    device_id: str = "dev-1",
    mqtt_port: int = 1883,
    **agent: Any,
) -> Path:
    prov = DeviceProvisioning.model_validate(
        {
            "device": {"id": device_id, "hardware_profile": PROFILE},
            "server": {"url": server_url, "token": TOKEN},
            "mqtt": {"host": "127.0.0.1", "port": mqtt_port},
            "trust": {
                "release_keys": [keys.release.public_pem().decode()],
                "server_keys": [keys.server.public_pem().decode()],
            },
            "agent": {"state_dir": "state", **FAST_AGENT, **agent},
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "agent.toml"
    path.write_text(prov.to_toml())
    return path


def assignment(
    bundle: BundleRef, *, device_id: str = "dev-1", deployment_id: str = "dep-1", **overrides: Any
) -> Assignment:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "deployment_id": deployment_id,
        "device_id": device_id,
        "model_name": bundle.model_name,
        "version": bundle.version,
        "release_counter": _counter(bundle.version),
        "hardware_profile": PROFILE,
        "bundle_sha256": bundle.sha256,
        "bundle_size": bundle.size,
        "bundle_url": bundle.url,
        "issued_at": now,
        "expires_at": now + timedelta(hours=1),
    }
    fields.update(overrides)
    return Assignment(**fields)


def signed(command: Any, key: SigningKey) -> bytes:
    return sign_command(command, key)


def _counter(version: str) -> int:
    from edgeota_contract.manifest import release_counter_from_version

    return release_counter_from_version(version)
