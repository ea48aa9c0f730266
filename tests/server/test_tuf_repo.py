"""The server's TUF repository: created at start-up, served at /tuf/ without auth, one target per accepted
bundle, the root handed out with provisioning, re-signing before expiry, rotation under a root threshold,
and the CLI. Metadata is checked with python-tuf itself (signatures against the root's keys)."""

from __future__ import annotations

import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tuf.api.metadata import Metadata, Root  # type: ignore[attr-defined]

from edgeota_contract.provisioning import DeviceProvisioning, tuf_target_path
from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.main import build_context
from ota_server.tuf_repo import TufPolicy, TufRepository, TufRepositoryError
from ota_server.tuf_service import TufRefresher

from .conftest import AUTH, BundleFactory, upload

EDGEOTA = str(Path(sys.executable).with_name("edgeota"))


def fetch(client: TestClient, name: str) -> Metadata[Any]:
    resp = client.get(f"/tuf/{name}")  # no Authorization header: public, read-only
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    return Metadata.from_bytes(resp.content)


def verified_chain(client: TestClient) -> tuple[Metadata[Any], Metadata[Any], Metadata[Any], Metadata[Any]]:
    """timestamp -> snapshot -> targets as a client walks them, each verified against root 1's keys."""
    root = fetch(client, "1.root.json")
    root.verify_delegate("root", root)
    ts = fetch(client, "timestamp.json")
    snap = fetch(client, f"{ts.signed.snapshot_meta.version}.snapshot.json")
    targets = fetch(client, f"{snap.signed.meta['targets.json'].version}.targets.json")
    for md in (ts, snap, targets):
        root.verify_delegate(md.signed.type, md)
        assert not md.signed.is_expired()
    assert root.signed.consistent_snapshot is True
    return root, ts, snap, targets


def test_each_accepted_bundle_becomes_a_target(client: TestClient, make_bundle: BundleFactory) -> None:
    _, ts0, snap0, targets0 = verified_chain(client)
    assert targets0.signed.targets == {}
    body = upload(client, make_bundle("1.0.0", "x86")).json()
    _, ts1, snap1, targets1 = verified_chain(client)
    target = targets1.signed.targets[tuf_target_path(body["bundle_sha256"])]
    assert (target.length, target.hashes) == (body["bundle_size"], {"sha256": body["bundle_sha256"]})
    assert target.custom == {
        "model_name": "digits",
        "version": "1.0.0",
        "hardware_profile": "x86",
        "release_counter": 1_000_000,
    }
    assert ts1.signed.version > ts0.signed.version and snap1.signed.version > snap0.signed.version
    assert targets1.signed.version == targets0.signed.version + 1
    # the previous consistent snapshot stays served for clients mid-refresh
    assert client.get(f"/tuf/{snap0.signed.version}.snapshot.json").status_code == 200
    # re-uploading the same bundle changes nothing
    upload(client, make_bundle("1.0.0", "x86"))
    assert fetch(client, "timestamp.json").signed.version >= ts1.signed.version
    assert len(verified_chain(client)[3].signed.targets) == 1


def test_bad_and_missing_metadata_names(client: TestClient) -> None:
    assert client.get("/tuf/99.root.json").status_code == 404
    for name in ("root.json", "..%2Fkeys%2Ftimestamp.pem", "1.timestamp.json", "x.json"):
        assert client.get(f"/tuf/{name}").status_code in (404, 422), name


def test_provisioning_hands_out_the_newest_root(client: TestClient, ctx: ServerContext) -> None:
    def provisioned_root() -> Metadata[Root]:
        resp = client.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=AUTH)
        assert resp.status_code == 201, resp.text
        prov = DeviceProvisioning.model_validate(tomllib.loads(resp.json()["agent_toml"]))
        assert prov.trust.tuf_root is not None
        return Metadata[Root].from_bytes(prov.trust.tuf_root.encode())

    assert provisioned_root().signed.version == 1
    assert ctx.tuf is not None
    ctx.tuf.rotate(sorted(ctx.tuf.keys_dir.glob("root-[0-9].pem")), rotate_roles=["timestamp"])
    assert provisioned_root().signed.version == 2


def test_refresh_resigns_only_what_is_due(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf")
    repo.initialize()
    now = datetime.now(UTC)
    assert repo.refresh(now) == []
    assert repo.refresh(now + timedelta(hours=13)) == ["timestamp"]  # past half of its 1-day lifetime
    ts = Metadata.from_bytes(repo.read_metadata("timestamp.json")).signed
    assert ts.version == 2 and ts.expires > now + timedelta(hours=36)
    assert repo.refresh(now + timedelta(days=4)) == ["snapshot", "targets", "timestamp"]


def test_refresher_thread_keeps_the_timestamp_fresh(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf", TufPolicy(timestamp_expiry=timedelta(seconds=2)))
    repo.initialize()
    refresher = TufRefresher(repo, interval=0.2)
    refresher.start()
    try:
        deadline = time.monotonic() + 20
        while Metadata.from_bytes(repo.read_metadata("timestamp.json")).signed.version < 3:
            assert time.monotonic() < deadline, "timestamp was not re-signed"
            time.sleep(0.1)
    finally:
        refresher.stop()


def test_rotation_needs_the_root_threshold(tmp_path: Path) -> None:
    repo = TufRepository(tmp_path / "tuf")
    keys = repo.initialize(root_keys=3, threshold=2)
    with pytest.raises(TufRepositoryError, match="not signed by enough root keys"):
        repo.rotate(keys[:1], rotate_roles=["timestamp"])
    assert repo.root_version() == 1 and not (repo.keys_dir / "timestamp.pem.revoked-v2").exists()
    with pytest.raises(TufRepositoryError, match="online roles"):
        repo.rotate(keys[:2], rotate_roles=["root"])
    result = repo.rotate(keys[1:], rotate_roles=["timestamp"], generate_root_keys=2, threshold=2)
    assert (result.root_version, result.root_threshold, len(result.root_keyids)) == (2, 2, 2)
    old = Metadata[Root].from_bytes(repo.read_metadata("1.root.json"))
    new = Metadata[Root].from_bytes(repo.read_metadata("2.root.json"))
    old.verify_delegate("root", new)  # the old threshold signed the new root ...
    new.verify_delegate("root", new)  # ... and so did the new one
    new.verify_delegate("timestamp", Metadata.from_bytes(repo.read_metadata("timestamp.json")))
    assert new.signed.roles["timestamp"].keyids != old.signed.roles["timestamp"].keyids


def test_start_up_makes_stored_bundles_targets(
    settings: Settings, client: TestClient, make_bundle: BundleFactory
) -> None:
    body = upload(client, make_bundle("2.0.0", "x86")).json()
    # a repository lost (or created after the bundles): the next start rebuilds every target from the database
    settings.resolved_tuf_dir.rename(settings.data_dir / "tuf-lost")
    ctx = build_context(settings)
    try:
        assert ctx.tuf is not None and tuf_target_path(body["bundle_sha256"]) in ctx.tuf.targets()
    finally:
        ctx.engine.dispose()


def test_disabled_tuf_serves_nothing_and_provisions_no_root(tmp_path: Path, settings: Settings) -> None:
    from ota_server.main import create_app

    app = create_app(settings.model_copy(update={"tuf_enabled": False, "data_dir": tmp_path / "no-tuf"}))
    with TestClient(app) as c:
        assert c.get("/tuf/timestamp.json").status_code == 404
        resp = c.post("/api/v1/devices", json={"hardware_profile": "x86"}, headers=AUTH)
        assert "tuf_root" not in resp.json()["agent_toml"]
    app.state.ctx.engine.dispose()


def test_cli_init_status_rotate(tmp_path: Path) -> None:
    env = {"EDGEOTA_SERVER_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EDGEOTA, "server", "tuf", *args], env=env, capture_output=True, text=True, timeout=60)

    offline = tmp_path / "offline"
    out = run("init", "--root-keys", "3", "--threshold", "2", "--root-key-dir", str(offline))
    assert out.returncode == 0, out.stderr
    keys = sorted(str(p) for p in offline.glob("root-[0-9].pem"))
    assert len(keys) == 3 and not list((tmp_path / "data" / "tuf" / "keys").glob("root-*"))
    again = run("init")
    assert again.returncode != 0 and again.stderr.strip().startswith("error: ") and "already exists" in again.stderr
    short = run("rotate", "--root-key", keys[0], "--role", "timestamp")
    assert short.returncode != 0 and short.stderr.count("\n") == 1 and "Traceback" not in short.stderr
    ok = run("rotate", "--root-key", keys[0], "--root-key", keys[2], "--role", "timestamp")
    assert ok.returncode == 0, ok.stderr
    assert "root version 2" in ok.stdout
    status = run("status", "--output", "json")
    assert status.returncode == 0 and '"version": 2' in status.stdout
