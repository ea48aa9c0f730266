"""The agent's TUF check (python-tuf ngclient) against metadata written by the server's repository module
and served over real HTTP: the happy path and every refusal python-tuf's own tests expect (freshness,
rollback, mix-and-match, thresholds, key rotation and revocation), plus target mismatches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from device_agent.update.tuf_client import RepositoryCheckError, check_target
from edgeota_contract.messages import Assignment
from edgeota_contract.states import ReasonCode
from ota_server.tuf_repo import bundle_custom
from tests.agent.agent_tuf_helpers import TufSite, make_site, past, resign
from tests.agent.conftest import PROFILE, BundleRef, assignment
from tests.agent.http_server import BundleServer

SHA = "ab" * 32
SIZE = 12_345


@pytest.fixture
def site(tmp_path: Path, open_server: BundleServer) -> TufSite:
    s = make_site(tmp_path, open_server)  # 2-of-3 root, as the brief's threshold tests want
    s.repo.add_bundle(SHA, SIZE, bundle_custom("digits", "1.0.0", PROFILE, 1_000_000))
    s.publish()
    return s


def _assignment(sha: str = SHA, size: int = SIZE, **kw: Any) -> Assignment:
    ref = BundleRef(Path("unused"), sha, kw.pop("version", "1.0.0"), size, f"/api/v1/bundles/{sha}")
    return assignment(ref, **kw)


def check(site: TufSite, tmp_path: Path, a: Assignment | None = None, **kw: Any) -> None:
    check_target(
        a or _assignment(),
        trusted_root=site.trusted_root(),
        metadata_url=site.url,
        metadata_dir=tmp_path / "agent-tuf",
        retries=kw.pop("retries", 0),
        backoff_seconds=0.0,
        timeout_seconds=5,
        **kw,
    )


def refused(site: TufSite, tmp_path: Path, a: Assignment | None = None) -> RepositoryCheckError:
    with pytest.raises(RepositoryCheckError) as info:
        check(site, tmp_path, a)
    return info.value


def test_a_target_with_the_assigned_length_and_hash_passes(site: TufSite, tmp_path: Path) -> None:
    check(site, tmp_path)
    # the client cached what it verified, so rollback protection survives a restart
    assert {"timestamp.json", "snapshot.json", "targets.json"} <= {p.name for p in (tmp_path / "agent-tuf").iterdir()}


def test_target_mismatches_are_refused(site: TufSite, tmp_path: Path) -> None:
    assert refused(site, tmp_path, _assignment(sha="cd" * 32)).reason == ReasonCode.NOT_IN_REPOSITORY
    assert refused(site, tmp_path, _assignment(size=SIZE + 1)).reason == ReasonCode.NOT_IN_REPOSITORY
    # length and hash match but the target records another version than the assignment names
    err = refused(site, tmp_path, _assignment(version="1.0.1", release_counter=1_000_000))
    assert err.reason == ReasonCode.NOT_IN_REPOSITORY and "version" in str(err)


def test_expired_timestamp_is_refused(site: TufSite, tmp_path: Path) -> None:
    # the repository publishes a new version whose timestamp was signed two days ago (1-day lifetime)
    site.repo.add_bundles([("ef" * 32, 10, {})], now=past(2))
    site.publish()
    err = refused(site, tmp_path)
    assert err.reason == ReasonCode.REPOSITORY_METADATA_EXPIRED and "timestamp" in str(err)


def test_older_timestamp_after_a_newer_one_is_refused(site: TufSite, tmp_path: Path) -> None:
    old_timestamp = site.served("timestamp.json")
    site.repo.add_bundle("ef" * 32, 10)
    site.publish()
    check(site, tmp_path)  # the device has seen the newer timestamp
    site.serve("timestamp.json", old_timestamp)  # a validly signed, unexpired, older one
    err = refused(site, tmp_path)
    assert err.reason == ReasonCode.REPOSITORY_METADATA_INVALID and "BadVersionNumber" in str(err)


def test_older_snapshot_after_a_newer_one_is_refused(site: TufSite, tmp_path: Path) -> None:
    site.repo.add_bundle("ef" * 32, 10)
    site.publish()
    check(site, tmp_path)
    ts = site.served("timestamp.json")
    from tuf.api.metadata import Metadata, MetaFile  # type: ignore[attr-defined]

    current = Metadata.from_bytes(ts).signed
    older = MetaFile(version=current.snapshot_meta.version - 1)
    # a fresh timestamp (newer version, timestamp key) that points at the previous snapshot
    site.serve(
        "timestamp.json",
        resign(ts, site.repo.keys_dir / "timestamp.pem", version=current.version + 1, snapshot_meta=older),
    )
    assert refused(site, tmp_path).reason == ReasonCode.REPOSITORY_METADATA_INVALID


def test_mixed_snapshot_and_targets_are_refused(site: TufSite, tmp_path: Path) -> None:
    old_targets = site.served("2.targets.json")
    site.repo.add_bundle("ef" * 32, 10)
    site.publish()
    # the snapshot names targets version 3; the mirror serves version 2's content under that name
    site.serve("3.targets.json", old_targets)
    err = refused(site, tmp_path)
    assert err.reason == ReasonCode.REPOSITORY_METADATA_INVALID and "targets" in str(err)


def test_root_below_threshold_is_refused(site: TufSite, tmp_path: Path) -> None:
    check(site, tmp_path)
    one_key = site.root_keys()[0]
    # root v2 signed by 1 of the 3 root keys where 2 are required
    site.serve("2.root.json", resign(site.served("1.root.json"), one_key, version=2))
    err = refused(site, tmp_path)
    assert err.reason == ReasonCode.REPOSITORY_METADATA_INVALID and "root" in str(err)


def test_rotation_replacing_the_timestamp_key_is_followed_and_the_old_key_refused(
    site: TufSite, tmp_path: Path
) -> None:
    check(site, tmp_path)  # trusts root v1 and its timestamp key
    result = site.repo.rotate(site.root_keys()[:2], rotate_roles=["timestamp"])
    assert result.root_version == 2
    site.publish()
    check(site, tmp_path)  # follows 1.root -> 2.root, accepts the timestamp signed by the new key
    assert (tmp_path / "agent-tuf" / "root_history" / "2.root.json").is_file()
    revoked = site.repo.keys_dir / "timestamp.pem.revoked-v2"
    ts = site.served("timestamp.json")
    from tuf.api.metadata import Metadata  # type: ignore[attr-defined]

    forged = resign(ts, revoked, version=Metadata.from_bytes(ts).signed.version + 10)
    site.serve("timestamp.json", forged)  # whoever holds the revoked key
    err = refused(site, tmp_path)
    assert err.reason == ReasonCode.REPOSITORY_METADATA_INVALID and "timestamp" in str(err)


def test_unsigned_garbage_is_refused(site: TufSite, tmp_path: Path) -> None:
    site.serve("timestamp.json", b'{"signed": {}, "signatures": []}')
    assert refused(site, tmp_path).reason == ReasonCode.REPOSITORY_METADATA_INVALID


def test_unreachable_repository_is_reported_after_retries(site: TufSite, tmp_path: Path) -> None:
    for name in [p for p in site.server.files if p.startswith("/tuf/")]:
        del site.server.files[name]
    slept: list[float] = []
    with pytest.raises(RepositoryCheckError) as info:
        check(site, tmp_path, retries=2, sleep=slept.append)
    assert info.value.reason == ReasonCode.REPOSITORY_UNREACHABLE and len(slept) == 2
