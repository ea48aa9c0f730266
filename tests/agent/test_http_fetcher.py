"""The agent's one HTTP client (``device_agent.transport.http``) and its users' edges: redirect rules for
uploads, bounded reads, and python-tuf's fetcher over it. Against real HTTP servers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from device_agent.transport.http import FetchError, open_url, resolve_url
from edgeota_contract.states import ReasonCode

TOKEN = "device-token-0123456789abcdef"


class Echo:
    """Answers every request per ``routes[path] = (status, headers, body)`` and records (method, path, auth, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.seen: list[tuple[str, str, str | None, bytes]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                owner.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
                status, headers, out = owner.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echo() -> Iterator[Echo]:
    srv = Echo()
    yield srv
    srv.close()


@pytest.fixture
def other() -> Iterator[Echo]:
    srv = Echo()
    yield srv
    srv.close()


def test_resolve_url_gives_the_token_only_to_the_servers_origin() -> None:
    assert resolve_url("http://srv:8080", "/api/v1/x") == ("http://srv:8080/api/v1/x", True)
    assert resolve_url("https://srv", "http://srv/x")[1] is False  # another scheme is another origin
    with pytest.raises(FetchError) as err:
        resolve_url("http://srv", "ftp://srv/x")
    assert err.value.reason == ReasonCode.ASSIGNMENT_INVALID


def test_an_upload_follows_307_with_its_body_and_not_a_303(echo: Echo, other: Echo) -> None:
    echo.routes["/up"] = (307, {"Location": f"{other.url}/store"}, b"")
    other.routes["/store"] = (201, {}, b"")
    with open_url(f"{echo.url}/up", method="POST", token=TOKEN, body=b"sample") as resp:
        assert resp.status == 201
    assert echo.seen[0][2] == f"Bearer {TOKEN}"
    assert other.seen == [("POST", "/store", None, b"sample")]  # same method and body, no token off-origin

    echo.routes["/see-other"] = (303, {"Location": "/elsewhere"}, b"")
    with open_url(f"{echo.url}/see-other", method="POST", token=TOKEN, body=b"sample") as resp:
        assert resp.status == 303  # handed back: an upload is never turned into a GET
    assert [s[1] for s in echo.seen] == ["/up", "/see-other"]


def test_get_follows_redirects_up_to_the_limit(echo: Echo) -> None:
    echo.routes["/loop"] = (302, {"Location": "/loop"}, b"")
    with pytest.raises(FetchError, match="more than 5 redirects") as err:
        open_url(f"{echo.url}/loop", token=TOKEN)
    assert err.value.reason == ReasonCode.DOWNLOAD_FAILED
    assert len(echo.seen) == 6


def test_read_limited_bounds_memory(echo: Echo) -> None:
    echo.routes["/big"] = (200, {}, b"x" * 100)
    with open_url(f"{echo.url}/big") as resp, pytest.raises(FetchError, match="exceeds"):
        resp.read_limited(99)
    with open_url(f"{echo.url}/big") as resp:
        assert resp.read_limited(100) == b"x" * 100


def test_open_url_refuses_other_schemes() -> None:
    with pytest.raises(FetchError, match="unsupported"):
        open_url("file:///etc/passwd")


def test_sample_upload_goes_through_the_fetcher_and_keeps_files_on_refusal(tmp_path: Path, echo: Echo) -> None:
    from device_agent.telemetry.sampling import InputSampler

    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "1-a.npz").write_bytes(b"one")
    sampler = InputSampler(folder, rate=1.0, max_files=10)
    echo.routes["/api/v1/devices/dev-1/samples"] = (401, {}, b"")
    assert sampler.persist_and_upload(echo.url, TOKEN, "/api/v1/devices/{device_id}/samples", "dev-1") == 0
    assert sampler.pending() and echo.seen[-1][2] == f"Bearer {TOKEN}"
    echo.routes["/api/v1/devices/dev-1/samples"] = (201, {}, b"")
    assert sampler.persist_and_upload(echo.url, TOKEN, "/api/v1/devices/{device_id}/samples", "dev-1") == 1
    assert not sampler.pending() and echo.seen[-1][3] == b"one"
    assert sampler.persist_and_upload(echo.url, TOKEN, "ftp://elsewhere/x", "dev-1") == 0  # logged, not raised
    assert sampler.persist_and_upload(echo.url, TOKEN, None, "dev-1") == 0


def test_tuf_fetcher_streams_follows_redirects_and_reports_http_errors(echo: Echo) -> None:
    from tuf.api import exceptions

    from device_agent.update.tuf_fetcher import AgentFetcher

    echo.routes["/metadata/1.root.json"] = (301, {"Location": "/real/1.root.json"}, b"")
    echo.routes["/real/1.root.json"] = (200, {}, b'{"signed": {}}')
    fetcher = AgentFetcher(timeout_seconds=5)
    assert fetcher.download_bytes(f"{echo.url}/metadata/1.root.json", 1000) == b'{"signed": {}}'
    with pytest.raises(exceptions.DownloadLengthMismatchError):
        fetcher.download_bytes(f"{echo.url}/metadata/1.root.json", 5)
    with pytest.raises(exceptions.DownloadHTTPError) as err:
        fetcher.download_bytes(f"{echo.url}/metadata/2.root.json", 1000)
    assert err.value.status_code == 404  # ngclient reads 403/404 on the next root as "no newer root"
    assert all(auth is None for _, _, auth, _ in echo.seen)  # TUF metadata is fetched without the device token
