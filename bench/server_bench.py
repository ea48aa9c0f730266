"""API latency of the OTA server under a fixed request rate (open loop).

Starts `edgeota server run` (MQTT off, engine on) on each database given, seeds a fleet and a
rollout covering it, then sends requests at ``--rate`` per second, alternating between the
device list (one page) and the rollout status, and records per-endpoint latency percentiles.
Latency is measured from each request's *scheduled* start, so a slow server cannot hide its
queueing (no coordinated omission). Results go to ``bench/results/server_bench.json``.

    flock /tmp/edgeota-bench.lock .venv/bin/python -m bench.server_bench --database sqlite \
        --database postgresql --workers 0 --workers 2 --out /tmp/server_bench.json

``postgresql`` creates (and drops) a throwaway database next to ``EDGEOTA_TEST_PG_URL``.

``--ingest`` runs the MQTT ingest benchmark instead (``bench/server_ingest.py``: old path and batched
writers, SQLite and PostgreSQL, merged under ``"ingest"`` into the same JSON):

    flock /tmp/edgeota-bench.lock .venv/bin/python -m bench.server_bench --ingest --ingest-devices 500
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

from ota_server.client import ApiClient, ApiClientError

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


def run_one(
    database: str, devices: int, rate: float, duration: float, page: int, workers: int = 0, profile: Path | None = None
) -> dict[str, Any]:
    """One server on ``database`` with ``workers`` API processes; ``profile``: py-spy raw stacks during the load."""
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
            [exe, "server", "run", "--port", str(port), "--workers", str(workers)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = ApiClient.connect(url, ADMIN, 30)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    api.health()
                    break
                except ApiClientError:
                    time.sleep(0.1)
            release = api.upload(bundle).release_id
            for i in range(devices):
                api.provision("x86", {"ring": str(i % 4)}, f"bench-{i:05d}")
            rollout = api.create_rollout(release, {"stages": [{"percent": 100}]}, start=True).rollout_id
            while api.rollout(rollout, deployments=False).counts["notified"] < devices:
                time.sleep(0.2)
            paths = [
                # Baseline: the HTTP stack's own floor at the same rate, on the same server.
                ("healthz_baseline", "/healthz"),
                ("device_list", f"/api/v1/devices?limit={page}&offset={devices // 2}"),
                ("rollout_status", f"/api/v1/rollouts/{rollout}?deployments=false"),
            ]
            spy = None
            if profile is not None:  # sample the server (and its workers) only while the load runs
                py_spy = str(Path(sys.executable).with_name("py-spy"))
                spy_args = ["record", "--pid", str(proc.pid), "--subprocesses", "--format", "raw", "--nonblocking"]
                spy = subprocess.Popen(
                    [py_spy, *spy_args, "--duration", str(int(duration)), "--output", str(profile)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            stats = _load(url, paths, rate, duration)
            if spy is not None:
                spy.wait(timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    backend = "sqlite" if database == "sqlite" else "postgresql"
    return {
        "database": backend,
        "server_workers": workers,
        "devices": devices,
        "rate": rate,
        "duration_s": duration,
        "page": page,
        **stats,
    }


# The previous results (bench/results/server_bench.json at commit 9a15b88: one server process, ORM rows in the
# rollout status and the engine tick), p50 / p95 ms, kept so every new report shows before and after.
BEFORE = {
    "commit": "9a15b88",
    "note": "single server process; same benchmark, same machine, an earlier run",
    "runs": [
        {
            "database": "sqlite",
            "healthz_baseline": {"p50_ms": 2.99, "p95_ms": 58.39},
            "device_list": {"p50_ms": 5.6, "p95_ms": 49.29},
            "rollout_status": {"p50_ms": 6.27, "p95_ms": 48.32},
        },
        {
            "database": "postgresql",
            "healthz_baseline": {"p50_ms": 155.26, "p95_ms": 329.77},
            "device_list": {"p50_ms": 88.42, "p95_ms": 220.19},
            "rollout_status": {"p50_ms": 91.34, "p95_ms": 222.34},
        },
    ],
}
TARGET_P95_MS = 50.0
ENDPOINTS = ("device_list", "rollout_status")


def _verdict(run: dict[str, Any]) -> str:
    worst = max(run[name]["p95_ms"] for name in ENDPOINTS)
    return "met" if worst < TARGET_P95_MS and not any(run[name]["errors"] for name in ENDPOINTS) else "missed"


def _report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    for r in runs:
        r["goal"] = _verdict(r)
    return {
        "benchmark": "ota_server API latency at a fixed request rate",
        "target": f"p95 < {TARGET_P95_MS:g} ms at 200 req/s on the device list and the rollout status",
        "baseline": "healthz_baseline: GET /healthz at the same rate on the same server (the HTTP stack's floor)",
        "setup": "load generator, server processes and PostgreSQL share the machine's cores (see host.cpus); "
        "server_workers 0 = one process for everything, N = N API processes plus a core process "
        "(engine, MQTT bridge)",
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "runs": runs,
        "before": BEFORE,
    }


def _with_pg_database(fn: Any) -> Any:
    """Run ``fn(url)`` on a throwaway PostgreSQL database (dropped afterwards)."""
    import uuid

    import psycopg

    admin = os.environ.get("EDGEOTA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
    name = f"edgeota_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        base = admin.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        return fn(f"{base}/{name}")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _matrix(
    databases: list[str],
    workers: list[int],
    devices: int,
    rate: float,
    duration: float,
    page: int,
    profile_dir: Path | None = None,
) -> Any:
    runs = []
    for database in databases:
        for n in workers:
            name = "postgresql" if database.startswith("postgresql") else "sqlite"
            profile = profile_dir / f"{name}-w{n}.txt" if profile_dir is not None else None
            if database == "postgresql":
                runs.append(
                    _with_pg_database(lambda url, n=n, p=profile: run_one(url, devices, rate, duration, page, n, p))
                )
            else:
                runs.append(run_one(database, devices, rate, duration, page, n, profile))
    return runs


def run(results_dir: Path, quick: bool = False) -> dict[str, Any]:
    """`make bench` entry point: SQLite and PostgreSQL, one process and 2 API workers, 200 req/s."""
    devices, duration = (200, 5.0) if quick else (1000, 20.0)
    report = _report(_matrix(["sqlite", "postgresql"], [0, 2], devices, 200.0, duration, 100))
    from bench.server_ingest import ingest_report

    report["ingest"] = ingest_report(["sqlite", "postgresql"], 100 if quick else 500, 4 if quick else 8)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "server_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--database", action="append", help="'sqlite', 'postgresql' (a throwaway database) or a SQLAlchemy URL"
    )
    parser.add_argument("--workers", type=int, action="append", help="server API workers (0 = one process)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--page", type=int, default=100, help="devices per list page")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "server_bench.json")
    parser.add_argument("--py-spy", type=Path, default=None, help="folder for py-spy raw stacks of each server")
    parser.add_argument("--ingest", action="store_true", help="MQTT ingest before/after (merged under 'ingest')")
    parser.add_argument("--ingest-devices", type=int, default=500, help="--ingest: devices publishing at once")
    parser.add_argument("--windows", type=int, default=8, help="--ingest: telemetry windows per device")
    args = parser.parse_args()
    if args.ingest:
        from bench.server_ingest import ingest_report, merge

        databases = args.database or ["sqlite", "postgresql"]
        report = ingest_report(databases, args.ingest_devices, args.windows)
        merge(args.out, "ingest", report)
        print(json.dumps(report, indent=2))
        return
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    runs = _matrix(
        args.database or ["sqlite"], args.workers or [0], args.devices, args.rate, args.duration, args.page, args.py_spy
    )
    report = _report(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
