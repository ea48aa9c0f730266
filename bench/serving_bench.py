"""Serving benchmarks -> bench/results/serving.json.

Measures, on this machine, in one run:

* **endpoint overhead**: per-request latency (p50, p99, batch 1) of the agent's inference endpoint
  (:mod:`device_agent.serving.http_endpoint`, in a process of its own with the agent's request path:
  :class:`~device_agent.serving.runtime.ModelRuntime` with the telemetry recorder) over the Unix socket and
  loopback TCP, JSON and binary tensors, against in-process ``predict`` on the same model, and beside a
  minimal ONNX Runtime HTTP server (stdlib ``http.server`` + ``InferenceSession.run``, JSON, written here) in
  a process of its own. The client is this process (one keep-alive connection per arm); arms are interleaved
  in rounds so load on the shared box hits them alike. The model is the project's digits CNN
  (:func:`bench.agent_bench.project_digits_cnn`, int8 as the agent serves it on ``x86-avx2``).
* **RSS with no model** of an agent with and without the endpoint open (the agent bench's method).
* **fleet rollback time**, before and after the fast rollback: N real agents (in one process, their own
  state folders, a real HTTP bundle server, signed commands) at 1.1.0 after 1.0.0 are ordered back to 1.0.0
  (``mode="rollback"``); the time from the order to every agent serving 1.0.0 with the deployment committed,
  with ``fast_rollback = false`` (a full trial window, the old behaviour) and ``true``, same trial settings.

Goals are reported, never asserted. Run: ``.venv/bin/python -m bench.serving_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from device_agent.serving.runtime import LoadedModel, ModelRuntime  # noqa: E402
from device_agent.telemetry.recorder import TelemetryRecorder  # noqa: E402
from edgeota_contract.signing import SigningKey  # noqa: E402

ENDPOINT_SCRIPT = r"""
import sys, json, pathlib
sys.path.insert(0, {root!r})
from device_agent.serving.runtime import ModelRuntime, SessionCache, load_model
from device_agent.serving.http_endpoint import EndpointConfig, InferenceEndpoint
from device_agent.telemetry.recorder import TelemetryRecorder
from edgeota_contract.manifest import BundleManifest
folder = pathlib.Path({folder!r})
manifest = BundleManifest.model_validate_json(pathlib.Path({manifest!r}).read_text())
model = load_model(folder, manifest, {sha!r}, "a", SessionCache())
runtime = ModelRuntime()
recorder = TelemetryRecorder()
runtime.add_listener(recorder.record)
runtime.install(model)
ep = InferenceEndpoint(EndpointConfig(socket_path=pathlib.Path({sock!r}), tcp_port=0),
                       lambda: runtime.current, runtime.predict_on)
ep.start()
print(ep.tcp_address[1], flush=True)
sys.stdin.read()
ep.stop()
"""

MINIMAL_ORT_SERVER = r"""
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import numpy as np
import onnxruntime as ort
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
sess = ort.InferenceSession({model!r}, sess_options=opts, providers=["CPUExecutionProvider"])
name = sess.get_inputs()[0].name
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else ~40 ms per answer: Nagle vs delayed ACK on its two writes
    def log_message(self, *a):
        pass
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        inp = body["inputs"][0]
        x = np.asarray(inp["data"], dtype=np.float32).reshape(inp["shape"])
        y = sess.run(None, {{name: x}})[0]
        out = json.dumps({{"outputs": [{{"name": "y", "shape": list(y.shape), "data": y.ravel().tolist()}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.daemon_threads = True
print(srv.server_address[1], flush=True)
import threading
threading.Thread(target=srv.serve_forever, daemon=True).start()
sys.stdin.read()
"""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def _percentiles(us: list[float]) -> dict[str, float]:
    arr = np.asarray(us)
    return {"p50_us": round(float(np.percentile(arr, 50)), 1), "p99_us": round(float(np.percentile(arr, 99)), 1)}


def _infer_bodies(name: str, x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    json_body = json.dumps(
        {"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    ).encode()
    header = json.dumps(
        {
            "inputs": [
                {"name": name, "shape": list(x.shape), "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}}
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    return {
        "json": (json_body, {"Content-Type": "application/json"}),
        "binary": (header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}),
    }


def _call(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> float:
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    elapsed = (time.perf_counter() - started) * 1e6
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {data[:200]!r}")
    return elapsed


def endpoint_overhead(model: LoadedModel, tmp: Path, requests: int, rounds: int) -> dict[str, Any]:
    """Latency per arm (p50/p99 in us) and the endpoint's overhead over in-process predict."""
    manifest = tmp / "manifest.json"
    manifest.write_text(model.manifest.model_dump_json())
    sock = tmp / "serve.sock"
    endpoint = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ENDPOINT_SCRIPT.format(
                root=str(ROOT),
                folder=str(model.folder),
                manifest=str(manifest),
                sha=model.bundle_sha256,
                sock=str(sock),
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    minimal = subprocess.Popen(
        [sys.executable, "-c", MINIMAL_ORT_SERVER.format(model=str(model.folder / "model.onnx"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert endpoint.stdout is not None and minimal.stdout is not None
        ep_port = int(endpoint.stdout.readline())
        min_port = int(minimal.stdout.readline())
        name = model.input_names[0]
        x = np.random.default_rng(0).uniform(
            0, 1, size=[1, *[d if isinstance(d, int) else 1 for d in model.manifest.inputs[0].shape[1:]]]
        )
        x = x.astype(np.float32)
        bodies = _infer_bodies(name, x)
        path = f"/v2/models/{model.manifest.model_name}/infer"
        conns = {
            "endpoint_uds": _UnixConnection(str(sock)),
            "endpoint_tcp": http.client.HTTPConnection("127.0.0.1", ep_port),
            "minimal_ort_tcp": http.client.HTTPConnection("127.0.0.1", min_port),
        }
        runtime = ModelRuntime()
        recorder = TelemetryRecorder()
        runtime.add_listener(recorder.record)
        runtime.install(model)
        inputs = {name: x}
        arms: dict[str, Any] = {
            "predict_in_process": lambda: _timed(lambda: runtime.predict(inputs)),
            "endpoint_uds_json": lambda: _call(conns["endpoint_uds"], path, *bodies["json"]),
            "endpoint_uds_binary": lambda: _call(conns["endpoint_uds"], path, *bodies["binary"]),
            "endpoint_tcp_json": lambda: _call(conns["endpoint_tcp"], path, *bodies["json"]),
            "endpoint_tcp_binary": lambda: _call(conns["endpoint_tcp"], path, *bodies["binary"]),
            "minimal_ort_server_tcp_json": lambda: _call(conns["minimal_ort_tcp"], "/", *bodies["json"]),
        }
        samples: dict[str, list[float]] = {k: [] for k in arms}
        for fn in arms.values():  # warm up: connections, sessions, caches
            for _ in range(50):
                fn()
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for key, fn in arms.items():
                samples[key].extend(fn() for _ in range(per_round))
        recorder.close()
        for conn in conns.values():
            conn.close()
    finally:
        for proc in (endpoint, minimal):
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result: dict[str, Any] = {k: _percentiles(v) for k, v in samples.items()}
    base = result["predict_in_process"]
    result["overhead_over_predict_us"] = {
        k: {q: round(v[q] - base[q], 1) for q in ("p50_us", "p99_us")}
        for k, v in result.items()
        if k.startswith("endpoint_") or k.startswith("minimal_")
    }
    result["requests_per_arm"] = per_round * rounds
    return result


def _timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6


def rss_no_model(serve: bool) -> float:
    from bench.agent_bench import RSS_SCRIPT

    script = RSS_SCRIPT.format(root=str(ROOT))
    if serve:
        script = script.replace(
            "Agent(AgentConfig.from_provisioning(prov))", "Agent(AgentConfig.from_provisioning(prov), serve=True)"
        )
        assert "serve=True" in script
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    return float(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ fleet rollback time


def fleet_rollback(tmp: Path, devices: int, trial_seconds: float, fast: bool) -> dict[str, Any]:
    """Seconds from a server-ordered rollback to every agent serving (and having committed) the old release."""
    from device_agent.agent import Agent
    from device_agent.serving.runtime import SessionCache
    from device_agent.settings import AgentConfig
    from edgeota_contract.states import DeploymentState
    from tests.agent.bundles import make_bundle
    from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
    from tests.agent.http_server import BundleServer

    logging.getLogger("device_agent").setLevel(logging.ERROR)  # no TUF repository here: one warning per update
    keys = Keys(SigningKey.generate(), SigningKey.generate())
    server = BundleServer(token="device-token-0123456789").start()
    cache = SessionCache()
    agents: list[Agent] = []

    def restart_all(**settings: Any) -> None:
        for agent in agents:
            agent.stop()
        agents[:] = [
            Agent(
                AgentConfig.load(write_config(tmp / f"dev-{n}", keys, server.url, device_id=f"dev-{n}", **settings)),
                connect=False,
                session_cache=cache,
            )
            for n in range(devices)
        ]
        for agent in agents:
            agent.start()

    try:
        refs = []
        for version, seed in (("1.0.0", 0), ("1.1.0", 5)):
            path, sha = make_bundle(tmp / f"{version}.tar", keys.release, version=version, seed=seed)
            url = f"/api/v1/artifacts/{sha}"
            server.add(url, path.read_bytes())
            refs.append(BundleRef(path, sha, version, path.stat().st_size, url))
        v1, v2 = refs
        # 1.0.0 then 1.1.0 everywhere, with a short trial (their trial is not what is measured)
        restart_all(trial_seconds=0.2, trial_requests=0)
        for dep, ref in (("dep-1", v1), ("dep-2", v2)):
            for n, agent in enumerate(agents):
                agent.handle_command(signed(assignment(ref, device_id=f"dev-{n}", deployment_id=dep), keys.server))
            for agent in agents:
                assert agent.wait_idle(120)
        restart_all(trial_seconds=trial_seconds, trial_requests=0, fast_rollback=fast, trial_probe_interval_seconds=1.0)
        started = time.monotonic()
        for n, agent in enumerate(agents):
            back = assignment(v1, device_id=f"dev-{n}", deployment_id="dep-3", mode="rollback")
            agent.handle_command(signed(back, keys.server))
        done: dict[int, float] = {}
        deadline = started + trial_seconds * 3 + 120
        while len(done) < devices and time.monotonic() < deadline:
            for n, agent in enumerate(agents):
                if n in done:
                    continue
                final = agent.state.finished_by_id("dep-3")
                cur = agent.runtime.current
                committed = final is not None and final.state == DeploymentState.COMMITTED
                if committed and cur is not None and cur.bundle_sha256 == v1.sha256:
                    done[n] = time.monotonic() - started
            time.sleep(0.05)
        times = sorted(done.values())
        return {
            "devices": devices,
            "fast_rollback": fast,
            "trial_seconds": trial_seconds,
            "all_back": len(done) == devices,
            "seconds_to_all_back": round(times[-1], 2) if times else None,
            "median_device_seconds": round(times[len(times) // 2], 2) if times else None,
        }
    finally:
        for agent in agents:
            agent.stop()
        server.stop()


def run(results_dir: Path, quick: bool) -> dict[str, Any]:
    """Run every serving figure and write ``results_dir/serving.json``."""
    from bench.agent_bench import project_digits_cnn

    results_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as raw:
        tmp = Path(raw)
        model = project_digits_cnn(tmp, SigningKey.generate())
        overhead = endpoint_overhead(model, tmp, requests=600 if quick else 4000, rounds=6 if quick else 20)
        rss = {
            "rss_mb_no_model": round(rss_no_model(False), 1),
            "rss_mb_no_model_serving": round(rss_no_model(True), 1),
        }
        devices, trial = (10, 10.0) if quick else (20, 30.0)
        before = fleet_rollback(tmp / "before", devices, trial, fast=False)
        after = fleet_rollback(tmp / "after", devices, trial, fast=True)
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "quick": quick,
        "model": f"{model.manifest.model_name} {model.manifest.recipe} (project digits CNN, batch 1)",
        "endpoint": overhead,
        "memory": {**rss, "rss_target_mb": 60, "goal_met": rss["rss_mb_no_model_serving"] <= 60},
        "fleet_rollback": {
            "before_full_trial": before,
            "after_fast_rollback": after,
            "note": "real agents in one process (no MQTT/server: signed commands handed to each agent); the time"
            " includes download, verification, smoke test and the trial or probe",
        },
    }
    (results_dir / "serving.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    print(json.dumps(run(args.results, args.quick), indent=2))


if __name__ == "__main__":
    main()
