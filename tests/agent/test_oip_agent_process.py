"""The inference endpoint of a real ``edgeota agent run`` process, called by clients in other processes.

Clients over the Unix socket and over loopback TCP get correct answers for the digits model, with zero
failures while releases are swapped and rolled back (server-ordered, over real Mosquitto) under load; each
answer names the release that produced it; the telemetry windows count every request; bad requests get
4xx answers in the protocol's error format and the agent keeps serving.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.agent.bundles import reference_model, sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker, free_port
from tests.server.procs import agent_process, wait_for_agent

pytestmark = pytest.mark.integration

SERVE_TOKEN = "local-serve-token-0123456789"


def _uds_client(sock: Path, token: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", headers=headers)


def _committed(recorder: Recorder, deployment_id: str) -> bool:
    return any(s["deployment_id"] == deployment_id and s["state"] == "committed" for s in recorder.of("status"))


def _ready(sock: Path, token: str | None = None) -> bool:
    if not sock.exists():
        return False
    try:
        with _uds_client(sock, token) as c:
            return c.get("/v2/health/ready").status_code == 200
    except httpx.HTTPError:
        return False


def test_clients_over_socket_and_tcp_see_no_failure_across_swaps_and_rollback(
    tmp_path: Path,
    keys: Keys,
    server: BundleServer,
    publish_bundle: Callable[..., BundleRef],
    mqtt_broker: Broker,
) -> None:
    device = f"oip-{os.getpid()}-{time.monotonic_ns()}"
    port = free_port()
    config = write_config(
        tmp_path, keys, server.url, device_id=device, mqtt_port=mqtt_broker.port, serve_tcp_port=port, trial_seconds=1.0
    )
    log = config.with_suffix(".log")
    sock = tmp_path / "state" / "serve.sock"
    v1, v2 = publish_bundle("1.0.0", seed=0), publish_bundle("1.1.0", seed=5)
    recorder = Recorder(mqtt_broker.host, mqtt_broker.port, device)
    clients: list[tuple[subprocess.Popen[bytes], Path]] = []
    stop_file = tmp_path / "stop"
    try:
        with agent_process(config) as proc:
            wait_for_agent(lambda: sock.exists(), 30, "the socket", proc, log)
            assert stat.S_IMODE(sock.stat().st_mode) == 0o660
            recorder.publish_cmd(signed(assignment(v1, device_id=device, deployment_id="dep-1"), keys.server))
            wait_for_agent(lambda: _committed(recorder, "dep-1") and _ready(sock), 60, "v1 committed", proc, log)
            for kind, target in (("uds", str(sock)), ("tcp", f"http://127.0.0.1:{port}")):
                out = tmp_path / f"client-{kind}.json"
                args = ["--uds", target] if kind == "uds" else ["--url", target]
                clients.append(
                    (
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "tests.agent.oip_client",
                                *args,
                                "--seeds",
                                "1.0.0=0,1.1.0=5",
                                "--stop-file",
                                str(stop_file),
                                "--out",
                                str(out),
                            ]
                        ),
                        out,
                    )
                )

            def seen(version: str) -> bool:
                return all(Path(f"{out}.{version}").exists() for _, out in clients)

            wait_for_agent(lambda: seen("1.0.0"), 60, "both clients answered by 1.0.0", proc, log)
            recorder.publish_cmd(signed(assignment(v2, device_id=device, deployment_id="dep-2"), keys.server))
            wait_for_agent(lambda: _committed(recorder, "dep-2"), 60, "v2 committed", proc, log)
            wait_for_agent(lambda: seen("1.1.0"), 60, "both clients answered by 1.1.0", proc, log)
            back = assignment(v1, device_id=device, deployment_id="dep-3", mode="rollback")
            recorder.publish_cmd(signed(back, keys.server))
            wait_for_agent(lambda: _committed(recorder, "dep-3"), 60, "rollback committed", proc, log)
            time.sleep(1.0)
            stop_file.write_text("stop")
            results = []
            for client, out in clients:
                assert client.wait(timeout=60) == 0
                results.append(json.loads(out.read_text()))
            for r in results:
                assert r["failed"] == 0, r["failures"]
                assert r["versions"].get("1.0.0", 0) > 0 and r["versions"].get("1.1.0", 0) > 0, r
            total = sum(r["ok"] for r in results)

            def counted() -> int:
                windows = {(w["boot_id"], w["seq"]): w for w in recorder.of("telemetry")}
                return sum(w["request_count"] for w in windows.values())

            # every request reached the serving path and was counted in a telemetry window, no more and no less
            wait_for_agent(lambda: counted() >= total, 30, "telemetry counting every request", proc, log)
            time.sleep(1.5)
            assert counted() == total
    finally:
        stop_file.write_text("stop")
        for client, _ in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        recorder.close()
    assert not sock.exists()  # removed on a clean stop


def test_bad_requests_get_4xx_in_protocol_format(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> None:
    port = free_port()
    config = write_config(
        tmp_path,
        keys,
        server.url,
        mqtt_port=free_port(),  # no broker: the endpoint does not need one
        serve_tcp_port=port,
        serve_token=SERVE_TOKEN,
        serve_max_body_bytes=4096,
        serve_socket_mode="0600",
    )
    log = config.with_suffix(".log")
    sock = tmp_path / "state" / "serve.sock"
    command = tmp_path / "assign.json"
    command.write_bytes(signed(assignment(publish_bundle("1.0.0")), keys.server))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    applied = subprocess.run(
        [sys.executable, "-m", "edgeota.cli", "agent", "apply", "--config", str(config), str(command)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert applied.returncode == 0, applied.stderr[-2000:]
    x = sample_inputs(1)
    good = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    with agent_process(config) as proc:
        wait_for_agent(lambda: _ready(sock, SERVE_TOKEN), 30, "the endpoint", proc, log)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        tcp = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {SERVE_TOKEN}"})
        with _uds_client(sock, SERVE_TOKEN) as uds, tcp:
            cases: list[tuple[str, httpx.Response, int]] = [
                ("unknown model", uds.post("/v2/models/nope/infer", json=good), 404),
                ("unknown model metadata", tcp.get("/v2/models/nope"), 404),
                ("unknown version", uds.get("/v2/models/digits/versions/9.9.9"), 404),
                ("unknown path", uds.get("/v3/foo"), 404),
                (
                    "wrong shape",
                    uds.post(
                        "/v2/models/digits/infer",
                        json={"inputs": [{"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0.5] * 63}]},
                    ),
                    400,
                ),
                (
                    "wrong dtype",
                    tcp.post(
                        "/v2/models/digits/infer",
                        json={"inputs": [{"name": "x", "shape": [1, 64], "datatype": "INT64", "data": [1] * 64}]},
                    ),
                    400,
                ),
                (
                    "wrong input name",
                    uds.post(
                        "/v2/models/digits/infer",
                        json={"inputs": [{"name": "z", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]},
                    ),
                    400,
                ),
                (
                    "data count off",
                    uds.post(
                        "/v2/models/digits/infer",
                        json={"inputs": [{"name": "x", "shape": [2, 64], "datatype": "FP32", "data": [0.5] * 64}]},
                    ),
                    400,
                ),
                ("malformed JSON", uds.post("/v2/models/digits/infer", content=b'{"inputs": ['), 400),
                ("JSON not an object", tcp.post("/v2/models/digits/infer", content=b"[1, 2]"), 400),
                ("oversized body", uds.post("/v2/models/digits/infer", content=b" " * 5000), 413),
                ("wrong method", uds.get("/v2/models/digits/infer"), 405),
                ("wrong method on health", tcp.post("/v2/health/live"), 405),
                (
                    "bad token",
                    httpx.post(
                        f"http://127.0.0.1:{port}/v2/models/digits/infer",
                        json=good,
                        headers={"Authorization": "Bearer nope"},
                    ),
                    401,
                ),
                ("no token", httpx.get(f"http://127.0.0.1:{port}/v2/health/live"), 401),
            ]
            for what, response, status in cases:
                assert response.status_code == status, (what, response.status_code, response.text)
                assert set(response.json()) == {"error"} and response.json()["error"], (what, response.text)
            # still alive and right after all that, on both transports
            for client in (uds, tcp):
                r = client.post("/v2/models/digits/infer", json={**good, "id": "req-1"})
                assert r.status_code == 200, r.text
                doc = r.json()
                assert (
                    doc["id"] == "req-1"
                    and doc["model_version"] == "1.0.0"
                    and len(doc["parameters"]["prediction_id"]) == 32
                )
                y = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(1, 10)
                assert np.allclose(y, reference_model(x), atol=1e-5)
            meta = uds.get("/v2/models/digits").json()
            assert meta["platform"] == "onnxruntime_onnx" and meta["versions"] == ["1.0.0"]
            assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 64]}]
            assert uds.get("/v2/models/digits/ready").status_code == 200
        assert proc.poll() is None
