"""API latency of the OTA server under a fixed request rate (open loop).

Starts `edgeota server run` (MQTT off, engine on) on each database given, seeds a fleet and a
rollout covering it, then sends requests at ``--rate`` per second, alternating between the
device list (one page) and the rollout status, and records per-endpoint latency percentiles.
Latency is measured from each request's *scheduled* start, so a slow server cannot hide its
queueing (no coordinated omission). Results go to ``bench/results/server_bench.json``.

    .venv/bin/python bench/server_bench.py --devices 1000 --rate 200 --duration 20 \
        --database sqlite --database postgresql+psycopg://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ADMIN = "bench-admin-token-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bundle(work: Path) -> tuple[Path, Path]:
    from edgeota_contract.bundle import create_bundle
    from edgeota_contract.manifest import Lineage
    from edgeota_contract.signing import SigningKey, write_keypair

    key = SigningKey.generate()
    _, pub = write_keypair(work / "release.pem", key)
    path = work / "bench.bundle.tar"
    create_bundle(
        path,
        {
            "model.onnx": b"m" * 1000,
            "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
            "test_vectors.npz": b"v",
            "model_card.md": b"# bench\n",
        },
        key,
        model_name="bench",
        version="1.0.0",
        release_counter=1_000_000,
        hardware_profile="x86",
        inputs=[{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, 2]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="fp32",
        lineage=Lineage(
            source_model_sha256="a" * 64, packager_version="bench", created_at=datetime.now(UTC), created_by="bench"
        ),
    )
    return path, pub


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _load(url: str, paths: list[tuple[str, str]], rate: float, duration: float, workers: int = 32) -> dict[str, Any]:
    """Open-loop load from ``workers`` threads, each with one keep-alive stdlib connection (a light client)."""
    split = urlsplit(url)
    results: dict[str, list[float]] = {name: [] for name, _ in paths}
    errors: dict[str, int] = dict.fromkeys(results, 0)
    total = int(rate * duration)
    counter = iter(range(total))
    lock = threading.Lock()
    start = time.perf_counter() + 0.5

    def worker() -> None:
        conn = http.client.HTTPConnection(split.hostname or "127.0.0.1", split.port, timeout=30)
        headers = {"Authorization": f"Bearer {ADMIN}"}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            name, path = paths[i % len(paths)]
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            ok = False
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection(split.hostname or "127.0.0.1", split.port, timeout=30)
            latency = (time.perf_counter() - scheduled) * 1000
            with lock:
                results[name].append(latency)
                if not ok:
                    errors[name] += 1
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    return {
        name: {
            "requests": len(lat),
            "errors": errors[name],
            "p50_ms": round(_percentile(lat, 0.50), 2),
            "p95_ms": round(_percentile(lat, 0.95), 2),
            "p99_ms": round(_percentile(lat, 0.99), 2),
            "max_ms": round(max(lat), 2) if lat else None,
        }
        for name, lat in results.items()
    } | {"achieved_rate": round(total / elapsed, 1)}


def run_one(database: str, devices: int, rate: float, duration: float, page: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgeota-bench-") as tmp:
        work = Path(tmp)
        bundle, pub = _bundle(work)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        db_url = f"sqlite:///{work / 'bench.db'}" if database == "sqlite" else database
        env = {
            **os.environ,
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_DATA_DIR": str(work / "data"),
            "EDGEOTA_SERVER_ADMIN_TOKEN": ADMIN,
            "EDGEOTA_SERVER_RELEASE_KEYS": str(pub),
            "EDGEOTA_SERVER_MQTT_ENABLED": "false",
            "EDGEOTA_SERVER_LOG_LEVEL": "WARNING",
            "EDGEOTA_SERVER_PUBLIC_URL": url,
        }
        exe = str(Path(sys.executable).with_name("edgeota"))
        proc = subprocess.Popen(
            [exe, "server", "run", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if http.get("/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            release = http.post(
                "/api/v1/bundles", content=bundle.read_bytes(), headers={"Content-Type": "application/octet-stream"}
            ).json()["release_id"]
            for i in range(devices):
                http.post(
                    "/api/v1/devices",
                    json={"device_id": f"bench-{i:05d}", "hardware_profile": "x86", "labels": {"ring": str(i % 4)}},
                )
            rollout = http.post(
                "/api/v1/rollouts", json={"release_id": release, "stages": [{"percent": 100}], "start": True}
            ).json()["rollout_id"]
            while http.get(f"/api/v1/rollouts/{rollout}").json()["counts"]["notified"] < devices:
                time.sleep(0.2)
            paths = [
                # Baseline: the HTTP stack's own floor at the same rate, on the same server.
                ("healthz_baseline", "/healthz"),
                ("device_list", f"/api/v1/devices?limit={page}&offset={devices // 2}"),
                ("rollout_status", f"/api/v1/rollouts/{rollout}?deployments=false"),
            ]
            stats = _load(url, paths, rate, duration)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    backend = "sqlite" if database == "sqlite" else "postgresql"
    return {"database": backend, "devices": devices, "rate": rate, "duration_s": duration, "page": page, **stats}


def _report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "benchmark": "ota_server API latency at a fixed request rate",
        "target": "p95 < 50 ms at 200 req/s",
        "baseline": "healthz_baseline: GET /healthz at the same rate on the same server (the HTTP stack's floor)",
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
    }


def run(results_dir: Path, quick: bool = False) -> dict[str, Any]:
    """`make bench` entry point: SQLite and a throwaway PostgreSQL database, 200 req/s."""
    import uuid

    import psycopg

    devices, duration = (200, 5.0) if quick else (1000, 20.0)
    runs = [run_one("sqlite", devices, 200.0, duration, 100)]
    admin = os.environ.get("EDGEOTA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"edgeota_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        runs.append(run_one(f"{base}/{name}", devices, 200.0, duration, 100))
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report = _report(runs)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "server_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", action="append", help="'sqlite' or a SQLAlchemy URL; repeatable")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--page", type=int, default=100, help="devices per list page")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_bench.json")
    args = parser.parse_args()
    runs = [run_one(db, args.devices, args.rate, args.duration, args.page) for db in (args.database or ["sqlite"])]
    report = _report(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
