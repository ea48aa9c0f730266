"""Raw-input sample upload by devices and export for ML engineers (both databases)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ota_server.context import ServerContext
from ota_server.services import samples as svc

from .conftest import AUTH, BundleFactory, make_token, upload


def _npz(seed: int) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{"in.x": np.random.default_rng(seed).normal(size=(2, 4)).astype(np.float32)})
    return buf.getvalue()


def _device(client: TestClient, device_id: str, profile: str = "x86") -> dict[str, str]:
    resp = client.post("/api/v1/devices", json={"device_id": device_id, "hardware_profile": profile}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


def _post(client: TestClient, device_id: str, body: bytes, auth: dict[str, str], sha: str, **headers: str) -> object:
    name = f"1763798400000000000-digits-1.0.0-{sha[:12]}.npz"
    return client.post(
        f"/api/v1/devices/{device_id}/samples",
        content=body,
        headers={"Content-Type": "application/octet-stream", "X-Edgeota-Sample": name, **auth, **headers},
    )


def _stored(ctx: ServerContext) -> list[Path]:
    root = svc.samples_root(ctx.settings.data_dir)
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _tmp_left(ctx: ServerContext) -> list[Path]:
    return list(ctx.settings.tmp_dir.glob("sample-*"))


@pytest.fixture
def bundle_sha(client: TestClient, make_bundle: BundleFactory) -> str:
    resp = upload(client, make_bundle("1.0.0", "x86"))
    assert resp.status_code == 201, resp.text
    sha: str = resp.json()["bundle_sha256"]
    return sha


def test_upload_list_download_and_archive(client: TestClient, ctx: ServerContext, bundle_sha: str) -> None:
    dev = _device(client, "cam-1")
    bodies = [_npz(i) for i in range(3)]
    for body in bodies:
        resp = _post(client, "cam-1", body, dev, bundle_sha)
        assert resp.status_code == 201, resp.text  # type: ignore[attr-defined]
    again = _post(client, "cam-1", bodies[0], dev, bundle_sha)  # a retry after a lost answer
    assert again.status_code == 200  # type: ignore[attr-defined]
    assert len(_stored(ctx)) == 3 and _tmp_left(ctx) == []
    assert ctx.metrics.snapshot()["samples_stored"] == 3

    viewer = make_token(client, "viewer")
    listing = client.get(
        "/api/v1/samples", params={"model_name": "digits", "version": "1.0.0", "profile": "x86"}, headers=viewer
    ).json()
    assert listing["count"] == 3
    assert {s["device_id"] for s in listing["samples"]} == {"cam-1"}
    assert client.get("/api/v1/samples", params={"profile": "arm"}, headers=viewer).json()["count"] == 0
    first = listing["samples"][0]
    got = client.get(first["download_url"], headers=viewer)
    assert got.status_code == 200 and got.content in bodies
    assert np.load(io.BytesIO(got.content))["in.x"].shape == (2, 4)

    archive = client.get("/api/v1/samples/archive", params={"model_name": "digits"}, headers=viewer)
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        members = {tar.extractfile(n).read() for n in names if n.endswith(".npz")}  # type: ignore[union-attr]
    assert len(index) == 3 and members == set(bodies)


def test_export_needs_viewer_and_valid_parameters(client: TestClient, bundle_sha: str) -> None:
    dev = _device(client, "cam-1")
    assert client.get("/api/v1/samples").status_code == 401
    assert client.get("/api/v1/samples", headers=dev).status_code == 403  # devices cannot read the dataset
    assert client.get("/api/v1/samples", params={"model_name": "../x"}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/samples/archive", headers=AUTH).status_code == 422  # model_name required
    missing = f"/api/v1/samples/digits/1.0.0/x86/cam-1/{'0' * 64}"
    assert client.get(missing, headers=AUTH).status_code == 404


def test_refused_uploads_store_nothing(
    client: TestClient, ctx: ServerContext, bundle_sha: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = _device(client, "cam-1")
    other = _device(client, "cam-2")
    arm = _device(client, "arm-1", profile="arm")
    body = _npz(0)
    cases = [
        (_post(client, "cam-1", body, {}, bundle_sha), 401),  # no token
        (_post(client, "cam-1", body, {"Authorization": "Bearer nope.nope"}, bundle_sha), 401),
        (_post(client, "cam-1", body, other, bundle_sha), 403),  # another device's path
        (_post(client, "cam-1", body, AUTH, bundle_sha), 403),  # an API token is not a device
        (_post(client, "cam-1", b"not a zip", dev, bundle_sha), 400),
        (_post(client, "cam-1", b"", dev, bundle_sha), 400),
        (_post(client, "cam-1", body, dev, "f" * 64), 422),  # names no stored bundle
        (_post(client, "arm-1", body, arm, bundle_sha), 422),  # a bundle of another hardware profile
        (_post(client, "cam-1", body, dev, bundle_sha, **{"X-Edgeota-Sample": "x.npz"}), 400),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
        assert resp.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]
    assert ctx.settings.max_sample_bytes == 16 * 1024 * 1024  # the default
    monkeypatch.setattr(ctx.settings, "max_sample_bytes", len(body) - 1)
    too_large = _post(client, "cam-1", body, dev, bundle_sha)
    assert too_large.status_code == 413, too_large.text  # type: ignore[attr-defined]
    assert too_large.headers["content-type"] == "application/problem+json"  # type: ignore[attr-defined]

    def chunks() -> object:  # no Content-Length: the cap holds while streaming
        yield body[:100]
        yield body[100:]

    streamed = client.post(
        "/api/v1/devices/cam-1/samples",
        content=chunks(),  # type: ignore[arg-type]
        headers={**dev, "X-Edgeota-Sample": f"1-digits-1.0.0-{bundle_sha[:12]}.npz"},
    )
    assert streamed.status_code == 413
    assert _stored(ctx) == [] and _tmp_left(ctx) == []
    assert client.get("/api/v1/samples", headers=AUTH).json()["count"] == 0


@pytest.mark.integration
def test_real_agent_sampler_uploads_to_the_route(
    client: TestClient, ctx: ServerContext, bundle_sha: str, tmp_path: Path
) -> None:
    """The device agent's own uploader, its default path, and a real HTTP server agree end to end."""
    import threading
    from types import SimpleNamespace

    import uvicorn

    from device_agent.settings import AgentSettings
    from device_agent.telemetry.sampling import InputSampler
    from tests.conftest import free_port, wait_for_port

    dev = _device(client, "cam-1")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for_port("127.0.0.1", port)
        sampler = InputSampler(tmp_path / "spool", rate=1.0, max_files=10)
        model = SimpleNamespace(
            manifest=SimpleNamespace(model_name="digits", version="1.0.0"), bundle_sha256=bundle_sha
        )
        inputs = [np.full((1, 4), i, dtype=np.float32) for i in range(2)]
        for x in inputs:
            sampler(model, {"x": x}, None, 1.0)  # type: ignore[arg-type]
        assert sampler.persist() == 2
        default_path = AgentSettings.model_fields["sample_upload_path"].default.format(device_id="cam-1")
        token = dev["Authorization"].split()[1]
        assert sampler.upload(f"http://127.0.0.1:{port}{default_path}", token) == 2
        assert sampler.pending() == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    listing = client.get("/api/v1/samples", params={"model_name": "digits"}, headers=AUTH).json()
    assert listing["count"] == 2
    got = [np.load(io.BytesIO(client.get(s["download_url"], headers=AUTH).content))["in.x"] for s in listing["samples"]]
    assert sorted(float(g[0, 0]) for g in got) == [0.0, 1.0]


def test_uploads_past_the_device_rate_are_refused_with_retry_after(
    client: TestClient, ctx: ServerContext, bundle_sha: str
) -> None:
    from ota_server.context import RateLimiter

    dev = _device(client, "cam-1")
    ctx.limiter = RateLimiter(0.001, 1)  # one upload, then (practically) none
    first = _post(client, "cam-1", _npz(0), dev, bundle_sha)
    assert first.status_code == 201, first.text  # type: ignore[attr-defined]
    refused = _post(client, "cam-1", _npz(1), dev, bundle_sha)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "5"  # type: ignore[attr-defined]
    assert refused.json()["detail"] == "sample upload rate exceeded"  # type: ignore[attr-defined]
    assert client.get("/api/v1/samples", headers=AUTH).json()["count"] == 1
