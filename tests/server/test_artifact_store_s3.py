"""Bundles in an S3-compatible object store: a real moto server process over real HTTP.

The store itself (put, exists, size, local copy, delete, presigned Range downloads), its refusals, and end to
end: a real ``edgeota server run`` with ``artifact_store = "s3"`` keeps an uploaded bundle in the bucket and
answers device downloads with a 307 to a presigned URL, which a real agent process follows to install and
commit the release.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeota_contract.errors import ContractError
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.signing import SigningKey, write_keypair
from ota_server.artifacts_s3 import ArtifactStoreError, S3ArtifactStore, S3Config
from ota_server.core.config import Settings
from ota_server.main import open_artifact_store
from tests.agent.bundles import make_bundle
from tests.agent.conftest import FAST_AGENT, PROFILE
from tests.agent.mqtt_helpers import Recorder
from tests.agent.test_poll_agent_process import finished, roll_out
from tests.conftest import Broker, free_port
from tests.server.conftest import Keys as ServerKeys
from tests.server.procs import ServerProcess, agent_process, wait_for_agent

pytestmark = pytest.mark.integration
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process on a free port (its own state, gone when it stops)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                httpx.get(url, timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _bucket(endpoint: str) -> str:
    import boto3

    name = f"edgeota-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_keys()).create_bucket(Bucket=name)
    return name


def _keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def _store(endpoint: str, bucket: str, cache: Path, **kw: Any) -> S3ArtifactStore:
    config = S3Config(bucket=bucket, endpoint_url=endpoint, access_key_id="testing", secret_access_key="testing", **kw)
    return S3ArtifactStore(config, cache)


def test_store_round_trip_and_presigned_range(tmp_path: Path, s3_endpoint: str) -> None:
    store = _store(s3_endpoint, _bucket(s3_endpoint), tmp_path / "cache")
    payload = os.urandom(300_000)
    sha = hashlib.sha256(payload).hexdigest()
    source = tmp_path / "upload.bin"
    source.write_bytes(payload)
    assert not store.exists(sha)
    store.put_file(sha, source)
    assert not source.exists()  # moved into the local copy, as the local store moves it
    assert store.exists(sha) and store.size(sha) == len(payload)

    # A second store (another server process) has no local copy: it downloads one.
    other = _store(s3_endpoint, store.config.bucket, tmp_path / "cache2")
    assert other.size(sha) == len(payload)
    assert other.local_path(sha).read_bytes() == payload

    url = store.redirect_url(sha)
    assert url is not None and url.startswith(s3_endpoint)
    whole = httpx.get(url, timeout=10)
    assert whole.status_code == 200 and whole.content == payload
    part = httpx.get(url, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert part.status_code == 206 and part.content == payload[1000:2000]

    store.delete(sha)
    fresh = _store(s3_endpoint, store.config.bucket, tmp_path / "cache3")
    assert not fresh.exists(sha)
    with pytest.raises(FileNotFoundError):
        fresh.local_path(sha)
    with pytest.raises(FileNotFoundError):
        fresh.size("not-a-sha")
    assert _store(s3_endpoint, store.config.bucket, tmp_path / "c4", redirect_downloads=False).redirect_url(sha) is None


def test_refusals(tmp_path: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArtifactStoreError, match="bucket 'no-such-bucket' is not usable"):
        _store(s3_endpoint, "no-such-bucket", tmp_path / "cache")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ArtifactStoreError):
        _store(dead, "any", tmp_path / "cache")
    with pytest.raises(ContractError, match="needs s3_bucket"):
        open_artifact_store(Settings(data_dir=tmp_path, artifact_store="s3"))
    s3 = {"artifact_store": "s3", "s3_endpoint_url": s3_endpoint}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(ContractError, match="no S3 credentials"):
        open_artifact_store(Settings(data_dir=tmp_path, s3_bucket="b", **s3))
    keys = {"s3_access_key_id": "testing", "s3_secret_access_key": "testing"}
    with pytest.raises(ContractError, match="bucket 'missing-bucket' is not usable"):
        open_artifact_store(Settings(data_dir=tmp_path, s3_bucket="missing-bucket", **s3, **keys))
    bucket = _bucket(s3_endpoint)
    assert isinstance(open_artifact_store(Settings(data_dir=tmp_path, s3_bucket=bucket, **s3, **keys)), S3ArtifactStore)


def test_server_process_with_s3_store_installs_through_presigned_redirect(
    tmp_path: Path, s3_endpoint: str, mqtt_broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    bucket = _bucket(s3_endpoint)
    release = SigningKey.generate()
    _, release_pub = write_keypair(tmp_path / "keys" / "release.pem", release)
    server = ServerProcess(
        tmp_path, f"sqlite:///{tmp_path / 'server.db'}", ServerKeys(release, release_pub), mqtt_broker
    )
    server.env.update(
        {
            "EDGEOTA_SERVER_ARTIFACT_STORE": "s3",
            "EDGEOTA_SERVER_S3_BUCKET": bucket,
            "EDGEOTA_SERVER_S3_ENDPOINT_URL": s3_endpoint,
        }
    )
    bundle, _ = make_bundle(tmp_path / "v1.bundle.tar", release, version="1.0.0")
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    with server.running():
        # Publishing first makes the bundle's hardware profile known to the server (provisioning checks it).
        server.api(
            "POST", "/api/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"}
        )
        device_id = f"s3-{uuid.uuid4().hex[:8]}"
        toml = server.api("POST", "/api/v1/devices", json={"device_id": device_id, "hardware_profile": PROFILE})
        prov = DeviceProvisioning.model_validate(tomllib.loads(toml["agent_toml"]))
        prov.agent.update({**FAST_AGENT, "state_dir": str(tmp_path / "device" / "state"), "trial_seconds": 1.0})
        config = tmp_path / "device" / "agent.toml"
        config.parent.mkdir(parents=True)
        config.write_text(prov.to_toml())
        try:
            with agent_process(config) as agent:
                deployment = roll_out(server, bundle, device_id)
                dep = wait_for_agent(
                    lambda: finished(deployment), 90, "the deployment", agent, config.with_suffix(".log")
                )
                assert dep["state"] == "committed", dep
        finally:
            Recorder(mqtt_broker.host, mqtt_broker.port, device_id).close()  # clears the retained presence
        # The bytes live in the bucket, not in the server's artifact folder.
        import boto3

        s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", **_keys())
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
        assert keys == [f"bundles/{sha}"]
        assert not (tmp_path / "server-data" / "artifacts").exists() or not any(
            (tmp_path / "server-data" / "artifacts").rglob(sha)
        )
        # Device downloads (here with the admin token) are sent to a presigned URL of the store.
        answer = server.http.get(f"/api/v1/artifacts/{sha}", follow_redirects=False)
        assert answer.status_code == 307, answer.text
        assert answer.headers["location"].startswith(f"{s3_endpoint}/{bucket}/bundles/{sha}?")
        assert httpx.get(answer.headers["location"], timeout=10).content == bundle.read_bytes()
