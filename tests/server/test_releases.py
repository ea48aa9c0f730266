"""Bundle upload (verified, size-capped, nothing left behind), releases, and device downloads."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from edgeota_contract.signing import SigningKey
from ota_server.context import ServerContext
from ota_server.models import Bundle, Release

from .conftest import AUTH, BundleFactory, make_token, upload


def _store_files(ctx: ServerContext) -> list[Path]:
    root = ctx.settings.resolved_artifact_dir
    tmp = ctx.settings.tmp_dir
    return [p for p in [*root.rglob("*"), *tmp.rglob("*")] if p.is_file()]


def _nothing_stored(ctx: ServerContext) -> None:
    assert _store_files(ctx) == []
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Bundle)) == 0
        assert session.scalar(select(func.count()).select_from(Release)) == 0


def test_upload_groups_profiles_into_one_release(
    client: TestClient, make_bundle: BundleFactory, ctx: ServerContext
) -> None:
    a = make_bundle("1.2.3", "x86")
    resp = upload(client, a)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["bundle_sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert body["bundle_size"] == a.stat().st_size
    assert (body["model_name"], body["version"], body["hardware_profile"], body["release_counter"]) == (
        "digits",
        "1.2.3",
        "x86",
        1_002_003,
    )
    assert upload(client, a).status_code == 200  # the same bundle again is idempotent
    second = upload(client, make_bundle("1.2.3", "arm64")).json()
    assert second["release_id"] == body["release_id"]
    release = client.get(f"/api/v1/releases/{body['release_id']}", headers=make_token(client, "viewer")).json()
    assert sorted(b["hardware_profile"] for b in release["bundles"]) == ["arm64", "x86"]
    assert release["metrics"]["x86"] == {"accuracy": 0.9} and release["lineage"]["created_by"] == "tests"
    assert [r["release_id"] for r in client.get("/api/v1/releases", headers=AUTH).json()] == [body["release_id"]]
    stored = ctx.store.local_path(body["bundle_sha256"])
    assert stored.read_bytes() == a.read_bytes()
    clash = upload(client, make_bundle("1.2.3", "x86"))  # other bytes, same version+profile
    assert clash.status_code == 409


def test_untrusted_unsigned_tampered_oversized_are_rejected(
    client: TestClient, make_bundle: BundleFactory, ctx: ServerContext, tmp_path: Path
) -> None:
    untrusted = make_bundle(key=SigningKey.generate())
    resp = upload(client, untrusted)
    assert resp.status_code == 422 and resp.json()["reason"] == "unknown_key"

    good = make_bundle()
    tampered = bytearray(good.read_bytes())
    idx = tampered.find(b"model digits")
    tampered[idx] ^= 0x01
    resp = client.post(
        "/api/v1/bundles", content=bytes(tampered), headers={**AUTH, "Content-Type": "application/octet-stream"}
    )
    assert resp.status_code == 422 and resp.json()["reason"] == "digest_mismatch"

    unsigned = tmp_path / "unsigned.tar"
    with tarfile.open(good) as tin, tarfile.open(unsigned, "w") as tout:
        for member in tin.getmembers():
            if member.name != "manifest.sig":
                tout.addfile(member, io.BytesIO(tin.extractfile(member).read()))  # type: ignore[union-attr]
    resp = upload(client, unsigned)
    assert resp.status_code == 422 and resp.json()["reason"] == "signature_missing"

    resp = client.post(
        "/api/v1/bundles", content=b"\0" * 300_000, headers={**AUTH, "Content-Type": "application/octet-stream"}
    )
    assert resp.status_code == 413

    def chunks():  # no Content-Length: the cap applies while streaming
        for _ in range(30):
            yield b"\0" * 10_000

    resp = client.post(
        "/api/v1/bundles", content=chunks(), headers={**AUTH, "Content-Type": "application/octet-stream"}
    )
    assert resp.status_code == 413
    assert client.post("/api/v1/bundles", content=b"garbage", headers=AUTH).status_code == 422
    assert client.post("/api/v1/bundles", content=b"", headers=AUTH).status_code == 400
    _nothing_stored(ctx)


def test_download_with_range_and_etag(client: TestClient, make_bundle: BundleFactory) -> None:
    path = make_bundle("1.0.0", "x86")
    data = path.read_bytes()
    sha = upload(client, path).json()["bundle_sha256"]
    dev = client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=AUTH).json()
    auth = {"Authorization": f"Bearer {dev['token']}"}
    url = f"/api/v1/artifacts/{sha}"
    full = client.get(url, headers=auth)
    assert full.status_code == 200 and full.content == data and full.headers["etag"] == f'"{sha}"'
    part = client.get(url, headers={**auth, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(url, headers={**auth, "Range": "bytes=-50"})
    assert tail.status_code == 206 and tail.content == data[-50:]
    rest = client.get(url, headers={**auth, "Range": f"bytes={len(data) - 10}-"})
    assert rest.content == data[-10:]
    for bad in (f"bytes={len(data)}-", "bytes=50-10", "items=0-1", "bytes=-"):
        resp = client.get(url, headers={**auth, "Range": bad})
        assert resp.status_code == 416 and resp.headers["content-range"] == f"bytes */{len(data)}"
    assert client.get(url, headers={**auth, "If-None-Match": f'"{sha}"'}).status_code == 304
    assert client.get(url, headers={**auth, "If-None-Match": '"other"'}).status_code == 200
    other = client.post("/api/v1/devices", json={"hardware_profile": "arm64"}, headers=AUTH).json()
    assert client.get(url, headers={"Authorization": f"Bearer {other['token']}"}).status_code == 403
    assert client.get("/api/v1/artifacts/" + "f" * 64, headers=auth).status_code == 404
    assert client.get("/api/v1/artifacts/not-a-digest", headers=auth).status_code == 422
