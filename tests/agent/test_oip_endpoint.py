"""The inference endpoint's I/O in-process (device_agent.serving.http_endpoint): binding, permissions, the
connection rules, and the settings that guard the TCP port."""

from __future__ import annotations

import json
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.serving.http_endpoint import EndpointConfig, InferenceEndpoint
from device_agent.serving.runtime import ModelRuntime, SessionCache, load_model
from device_agent.settings import AgentConfig
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.errors import ContractError
from edgeota_contract.signing import TrustedKeys
from tests.agent.bundles import make_bundle, reference_model, sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer


@pytest.fixture
def runtime(tmp_path: Path, keys: Keys) -> ModelRuntime:
    path, _ = make_bundle(tmp_path / "b.tar", keys.release)
    v = verify_bundle(path, TrustedKeys([keys.release.public_key]), extract_to=tmp_path / "slot")
    rt = ModelRuntime()
    rt.install(load_model(tmp_path / "slot", v.manifest, v.archive_sha256, "a", SessionCache()))
    return rt


@pytest.fixture
def endpoint(tmp_path: Path, runtime: ModelRuntime) -> Iterator[InferenceEndpoint]:
    ep = InferenceEndpoint(
        EndpointConfig(socket_path=tmp_path / "run" / "serve.sock", socket_mode=0o600, tcp_port=0, max_body_bytes=2048),
        lambda: runtime.current,
        runtime.predict_on,
    )
    ep.start()
    yield ep
    ep.stop()


def _raw(sock: socket.socket, request: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes; read answers until the server closes or 1 s passes."""
    sock.settimeout(1.0)
    sock.sendall(request)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        n = int(headers.get("content-length", "0"))
        answers.append((int(lines[0].split()[1]), headers, rest[:n]))
        data = rest[n:]
    return answers


def _unix(ep: InferenceEndpoint) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    assert ep.config.socket_path is not None
    s.connect(str(ep.config.socket_path))
    return s


def test_socket_mode_and_cleanup(endpoint: InferenceEndpoint) -> None:
    path = endpoint.config.socket_path
    assert path is not None and path.is_socket()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["serve.sock"]  # no temporary name left
    endpoint.stop()
    assert not path.exists()
    endpoint.stop()  # idempotent


def test_stop_ends_idle_keep_alive_connections(endpoint: InferenceEndpoint) -> None:
    s = _unix(endpoint)
    s.settimeout(5.0)
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n")
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    endpoint.stop()
    assert s.recv(65536) == b""  # the server ended the connection instead of serving it on
    s.close()


def test_a_stale_socket_file_is_replaced(tmp_path: Path, runtime: ModelRuntime) -> None:
    path = tmp_path / "serve.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # left behind as by a killed agent
    stale.close()
    ep = InferenceEndpoint(EndpointConfig(socket_path=path), lambda: runtime.current, runtime.predict_on)
    ep.start()
    try:
        with _unix(ep) as s:
            assert _raw(s, b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")[0][0] == 200
    finally:
        ep.stop()


def test_keep_alive_survives_errors_whose_body_was_read(endpoint: InferenceEndpoint) -> None:
    x = sample_inputs(1)
    good = json.dumps({"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]})
    bad = b'{"inputs": ['
    req = (
        f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {len(bad)}\r\n\r\n".encode()
        + bad
        + f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: {len(good)}\r\n\r\n{good}".encode()
        + b"HEAD /v2/health/ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    with _unix(endpoint) as s:
        answers = _raw(s, req)
    assert [a[0] for a in answers] == [400, 200, 200]
    assert "malformed JSON" in json.loads(answers[0][2])["error"]
    y = np.asarray(json.loads(answers[1][2])["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
    assert np.allclose(y, reference_model(x), atol=1e-5)
    assert answers[2][2] == b""  # HEAD: no body


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: 999999\r\n\r\n", 413),
        (b"POST /v2/nothing HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n", 404),
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", 411),
        (b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
    ],
)
def test_an_unread_body_closes_the_connection(endpoint: InferenceEndpoint, head: bytes, status: int) -> None:
    with _unix(endpoint) as s:
        answers = _raw(s, head + b"0123456789")
    assert len(answers) == 1 and answers[0][0] == status
    assert answers[0][1].get("connection") == "close"
    assert set(json.loads(answers[0][2])) == {"error"}


def test_tcp_listens_on_loopback(endpoint: InferenceEndpoint) -> None:
    assert endpoint.tcp_address is not None and endpoint.tcp_address[0] == "127.0.0.1"
    with socket.create_connection(endpoint.tcp_address) as s:
        answers = _raw(s, b"GET /v2/models/digits/ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answers[0][0] == 200 and json.loads(answers[0][2]) == {"name": "digits", "ready": True}


def test_no_model_yet(tmp_path: Path) -> None:
    rt = ModelRuntime()
    ep = InferenceEndpoint(EndpointConfig(socket_path=tmp_path / "s.sock"), lambda: rt.current, rt.predict_on)
    ep.start()
    try:
        with _unix(ep) as s:
            req = b"GET /v2/health/ready HTTP/1.1\r\nHost: a\r\n\r\nGET /v2/models/digits HTTP/1.1\r\nHost: a\r\n"
            answers = _raw(s, req + b"Connection: close\r\n\r\n")
        assert [a[0] for a in answers] == [400, 404]
    finally:
        ep.stop()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "::"])
def test_a_non_loopback_bind_is_refused_unless_allowed(
    host: str, tmp_path: Path, keys: Keys, server: BundleServer
) -> None:
    with pytest.raises(ContractError, match="not a loopback address"):
        AgentConfig.load(write_config(tmp_path, keys, server.url, serve_tcp_host=host, serve_tcp_port=8001))
    cfg = AgentConfig.load(
        write_config(tmp_path, keys, server.url, serve_tcp_host=host, serve_tcp_port=8001, serve_allow_remote=True)
    )
    assert cfg.settings.serve_tcp_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_hosts_are_fine(host: str, tmp_path: Path, keys: Keys, server: BundleServer) -> None:
    assert (
        AgentConfig.load(write_config(tmp_path, keys, server.url, serve_tcp_host=host)).settings.serve_tcp_host == host
    )


@pytest.mark.parametrize(
    ("key", "value"), [("serve_token", "short"), ("serve_socket_mode", "999"), ("serve_tcp_port", 70000)]
)
def test_bad_serve_settings(key: str, value: Any, tmp_path: Path, keys: Keys, server: BundleServer) -> None:
    with pytest.raises(ContractError, match=key):
        AgentConfig.load(write_config(tmp_path, keys, server.url, **{key: value}))


def test_socket_path_defaults_to_the_state_folder(tmp_path: Path, keys: Keys, server: BundleServer) -> None:
    s = AgentConfig.load(write_config(tmp_path, keys, server.url)).settings
    assert s.serve_socket_path == s.state_dir / "serve.sock"
    s = AgentConfig.load(write_config(tmp_path, keys, server.url, serve_socket="x/api.sock")).settings
    assert s.serve_socket_path == s.state_dir / "x" / "api.sock"


# ------------------------------------------------------------------ through a started agent


def _infer(sock: Path, n: int, rows: int = 4) -> list[dict[str, object]]:
    import httpx

    x = sample_inputs(rows, seed=3)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent") as c:
        out = []
        for _ in range(n):
            r = c.post("/v2/models/digits/infer", json=body)
            assert r.status_code == 200, r.text
            out.append(r.json())
        return out


def test_shadow_deferral_and_telemetry_see_endpoint_requests(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    """Requests over the socket are live requests like ``predict``'s: the shadow candidate compares them, the
    telemetry window counts them, and a deferring application holds the switch while they keep being served."""
    busy = threading.Event()
    busy.set()
    config = AgentConfig.load(write_config(tmp_path, keys, server.url, deferral_poll_seconds=0.05))
    agent = Agent(config, connect=False, session_cache=SessionCache(), serve=True, defer_update=lambda a: busy.is_set())
    agent.start()
    try:
        sock = config.settings.serve_socket_path
        assert agent.endpoint is not None and sock.is_socket()
        busy.clear()
        agent.handle_command(signed(assignment(publish_bundle("1.0.0"), deployment_id="dep-0"), keys.server))
        assert agent.wait_idle(30)
        agent._roll_telemetry()  # start counting from here
        agent.handle_command(
            signed(
                assignment(
                    publish_bundle("1.2.0", seed=9), deployment_id="dep-s", mode="shadow", shadow_sample_rate=1.0
                ),
                keys.server,
            )
        )
        assert agent.wait_idle(30) and agent.shadow is not None
        answers = _infer(sock, 5)
        assert {a["model_version"] for a in answers} == {"1.0.0"}
        agent.shadow.drain()
        summary = agent.shadow.take_summary()
        assert summary is not None and summary.compared == 20  # 5 requests of 4 rows, every one sampled
        windows = agent.telemetry.roll()
        assert sum(w.request_count for w in windows) == 5
        # a deferring application: the switch waits, the endpoint keeps serving the old release
        busy.set()
        agent.handle_command(signed(assignment(publish_bundle("1.1.0", seed=5), deployment_id="dep-2"), keys.server))
        deadline = time.monotonic() + 10
        while agent.state.deployment is None or agent.state.deployment.deferred_since is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert {a["model_version"] for a in _infer(sock, 3)} == {"1.0.0"}
        busy.clear()
        assert agent.wait_idle(30)
        assert {a["model_version"] for a in _infer(sock, 3)} == {"1.1.0"}
    finally:
        agent.stop()
    assert agent.endpoint is None and not sock.exists()
