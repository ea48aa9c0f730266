"""The downloader's rules in isolation, against the real test HTTP server (fake sleep where time matters)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from device_agent.transport.http import FetchError, follow_redirect, resolve_url
from device_agent.update.download import DownloadError, DownloadPolicy, backoff_delay, download
from edgeota_contract.states import ReasonCode
from tests.agent.http_server import BundleServer

DATA = bytes(range(256)) * 400  # 100 KiB
FAST = DownloadPolicy(timeout_seconds=10, stall_seconds=2, retries=2, backoff_seconds=0.01, backoff_max_seconds=0.02)


def test_resolve_url_sends_token_only_to_the_server() -> None:
    assert resolve_url("http://srv:8080", "/api/v1/artifacts/x") == ("http://srv:8080/api/v1/artifacts/x", True)
    assert resolve_url("http://srv:8080/base/", "/api/x")[0] == "http://srv:8080/base/api/x"
    assert resolve_url("http://srv:8080", "http://cdn.example/x") == ("http://cdn.example/x", False)
    assert resolve_url("http://srv:8080", "http://srv:8080/x")[1] is True
    with pytest.raises(FetchError) as err:
        resolve_url("http://srv:8080", "file:///etc/passwd")
    assert err.value.reason == ReasonCode.ASSIGNMENT_INVALID


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = DownloadPolicy(backoff_seconds=1.0, backoff_max_seconds=8.0)
    rng = random.Random(1)
    for attempt, cap in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (6, 8.0)]:
        delays = [backoff_delay(attempt, policy, rng) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8  # jitter spreads over the whole range


def test_resumes_an_existing_part_file(tmp_path: Path, server: BundleServer) -> None:
    server.add("/b", DATA)
    part = tmp_path / "b.part"
    part.write_bytes(DATA[:30000])
    download(f"{server.url}/b", part, len(DATA), token=server.token, policy=FAST)
    assert part.read_bytes() == DATA
    assert [r.get("range") for r in server.requests] == ["bytes=30000-"]


def test_bandwidth_cap_paces_the_download(tmp_path: Path, server: BundleServer) -> None:
    server.add("/b", DATA)
    slept: list[float] = []
    policy = DownloadPolicy(rate_limit_bps=20_000, stall_seconds=2)
    download(f"{server.url}/b", tmp_path / "b.part", len(DATA), token=server.token, policy=policy, sleep=slept.append)
    # The fake sleep does not move the clock, so the last request is the whole pacing debt: ~5 s for
    # 100 KiB at 20 kB/s, less the time the transfer itself took.
    assert 4.0 < max(slept) <= len(DATA) / 20_000 + 0.01


def test_announced_oversize_refused_and_part_removed(tmp_path: Path, server: BundleServer) -> None:
    server.add("/b", DATA)
    part = tmp_path / "b.part"
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/b", part, len(DATA) - 1, token=server.token, policy=FAST)
    assert err.value.reason == ReasonCode.DOWNLOAD_TOO_LARGE
    assert not part.exists()


def test_wrong_token_is_not_retried(tmp_path: Path, server: BundleServer) -> None:
    server.add("/b", DATA)
    with pytest.raises(DownloadError, match="HTTP 401") as err:
        download(f"{server.url}/b", tmp_path / "b.part", len(DATA), token="wrong-token-000000", policy=FAST)
    assert err.value.reason == ReasonCode.DOWNLOAD_FAILED
    assert len(server.requests) == 1


def test_connection_refused_retried_then_failed(tmp_path: Path) -> None:
    slept: list[float] = []
    with pytest.raises(DownloadError) as err:
        download("http://127.0.0.1:1/b", tmp_path / "b.part", 10, token=None, policy=FAST, sleep=slept.append)
    assert err.value.reason == ReasonCode.DOWNLOAD_FAILED
    assert len(slept) == FAST.retries


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_no_space_left_is_disk_full(tmp_path: Path, server: BundleServer) -> None:
    """A real ENOSPC: the part file is a symlink to /dev/full (only the link is removed afterwards)."""
    server.add("/b", DATA)
    part = tmp_path / "b.part"
    part.symlink_to("/dev/full")
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/b", part, len(DATA), token=server.token, policy=FAST)
    assert err.value.reason == ReasonCode.DISK_FULL
    assert not part.is_symlink() and Path("/dev/full").exists()


def test_range_answer_for_another_offset_restarts(tmp_path: Path, server: BundleServer) -> None:
    """A server answering bytes=0- to a resume would corrupt the file: the part is dropped and fetched again."""
    server.add("/b", DATA, mode="lie_range")
    part = tmp_path / "b.part"
    part.write_bytes(DATA[:1000])
    download(f"{server.url}/b", part, len(DATA), token=server.token, policy=FAST)
    assert part.read_bytes() == DATA
    assert [r.get("range") for r in server.requests] == ["bytes=1000-", "bytes=0-"]


def test_stalled_server_times_out_and_part_removed(tmp_path: Path, server: BundleServer) -> None:
    server.add("/b", DATA, mode="stall", trickle_delay=3.0)
    part = tmp_path / "b.part"
    policy = DownloadPolicy(timeout_seconds=30, stall_seconds=0.3, retries=1, backoff_seconds=0.01)
    with pytest.raises(DownloadError) as err:
        download(f"{server.url}/b", part, len(DATA), token=server.token, policy=policy)
    assert err.value.reason == ReasonCode.DOWNLOAD_TIMEOUT
    assert not part.exists()
    assert len(server.requests) == 2  # retried once, resuming from what the first attempt got
    assert server.requests[1]["range"] == f"bytes={len(DATA) // 2}-"


def test_redirect_on_the_same_origin_keeps_the_token_and_the_range(tmp_path: Path, server: BundleServer) -> None:
    server.add("/real", DATA)
    server.redirect("/b", "/hop", 301)
    server.redirect("/hop", f"{server.url}/real", 307)
    part = tmp_path / "b.part"
    part.write_bytes(DATA[:1000])
    download(f"{server.url}/b", part, len(DATA), token=server.token, policy=FAST)
    assert part.read_bytes() == DATA
    assert [r["path"] for r in server.requests] == ["/b", "/hop", "/real"]
    assert all(r.get("authorization") == f"Bearer {server.token}" for r in server.requests)
    assert {r.get("range") for r in server.requests} == {"bytes=1000-"}


def test_redirect_to_another_origin_never_sends_the_token(
    tmp_path: Path, server: BundleServer, open_server: BundleServer
) -> None:
    """The OTA server hands the download to a CDN or object store: the device token stays with the server."""
    open_server.add("/cdn/b", DATA)
    server.redirect("/b", f"{open_server.url}/cdn/b", 302)
    download(f"{server.url}/b", tmp_path / "b.part", len(DATA), token=server.token, policy=FAST)
    assert (tmp_path / "b.part").read_bytes() == DATA
    assert server.requests[0].get("authorization") == f"Bearer {server.token}"
    assert [r["path"] for r in open_server.requests] == ["/cdn/b"]
    assert "authorization" not in open_server.requests[0]


@pytest.mark.parametrize(
    ("location", "needle"),
    [("/b", "more than 5 redirects"), ("", "without a Location"), ("ftp://example.org/b", "unsupported URL")],
    ids=["loop", "no-location", "ftp"],
)
def test_bad_redirects_refused_and_not_retried(
    tmp_path: Path, server: BundleServer, location: str, needle: str
) -> None:
    server.redirect("/b", location)
    part = tmp_path / "b.part"
    with pytest.raises(DownloadError, match=needle) as err:
        download(f"{server.url}/b", part, len(DATA), token=server.token, policy=FAST)
    assert err.value.reason == ReasonCode.DOWNLOAD_FAILED
    assert len(server.requests) == (6 if location == "/b" else 1)  # a decided failure: no retry
    assert not part.exists()


def test_follow_redirect_refuses_a_downgrade_to_http() -> None:
    assert follow_redirect("https://srv/a/b", "c") == "https://srv/a/c"
    assert follow_redirect("http://srv/a", "https://cdn/x") == "https://cdn/x"
    with pytest.raises(FetchError, match="https to http"):
        follow_redirect("https://srv/a", "http://cdn/x")
