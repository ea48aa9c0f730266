"""Dashboard page time at fleet scale (``python -m bench.run --only dashboard``; JSON ``dashboard.json``).

For each database (SQLite, and a throwaway PostgreSQL database beside ``EDGEOTA_TEST_PG_URL``, dropped afterwards):
``edgeota server run`` (MQTT and the rollout engine off, so the data stays as seeded) migrates an empty database and
takes two releases x two profiles through the API; it is stopped, :mod:`bench.dashboard_seed` writes the fleet
(10,000 devices, 24 h of telemetry aggregates, two rollouts with their deployments, status events and audit trail)
with bulk inserts, and the server is started again. A client signs in through the login form and requests every
dashboard page ``repeat`` times, one request at a time (no queueing), beside the JSON API call that serves the same
data and ``/healthz`` (the HTTP floor), all over loopback on one keep-alive connection.

Server time: the ``Server-Timing`` header when a response carries one (``dur`` of its entries, the largest), else
the time at the client over loopback (it includes the HTTP stack and the client, so it overstates the server's
share; ``timing`` in the JSON says which). The goal, p95 under 300 ms per page, is reported met or missed, never
asserted. Run alone: ``.venv/bin/python -m bench.dashboard_bench [--quick] [--database sqlite|postgresql]``.
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin-token-0123456789"
GOAL_P95_MS = 300.0
CSRF = re.compile(r"""name=["']csrf["'][^>]*value=["']([^"']+)["']|value=["']([^"']+)["'][^>]*name=["']csrf["']""")


@dataclass(frozen=True)
class Page:
    name: str
    ui: str
    api: str
    api_note: str


def pages(seeded: Any, since: datetime) -> list[Page]:
    """Every main page with the JSON API call that serves the same data (placeholders filled per request).

    The API's telemetry summary reads the aggregates only from a ``since`` on a bucket boundary (else it reads
    every window): the call here asks from the start of the bucket, as a client wanting the fast path does.
    """
    since = since.replace(microsecond=0) - timedelta(seconds=int(since.timestamp()) % 300)
    since_q = quote(since.isoformat())
    return [
        Page("overview", "/ui/", "/api/v1/devices?limit=100000", "every device: a client counts them itself"),
        Page("rollouts", "/ui/rollouts", "/api/v1/rollouts?limit=50", "one page of rollouts"),
        Page(
            "rollout",
            f"/ui/rollouts/{seeded.rollout_running}",
            f"/api/v1/rollouts/{seeded.rollout_running}?deployments=false",
            "status and counts, no per-device list",
        ),
        Page(
            "rollout_live",
            f"/ui/rollouts/{seeded.rollout_running}/live.json",
            f"/api/v1/rollouts/{seeded.rollout_running}?deployments=false",
            "what the page polls every 2 s",
        ),
        Page(
            "devices",
            "/ui/devices?labels=cohort%3Dnorth&online=yes&page=3",
            "/api/v1/devices?label=cohort%3Dnorth&online=true&limit=50&offset=100",
            "one filtered page of 50",
        ),
        Page("device", "/ui/devices/{device}", "/api/v1/devices/{device}", "device detail (20 devices in turn)"),
        Page("releases", "/ui/releases", "/api/v1/releases", "every release"),
        Page("release", "/ui/releases/{release}", "/api/v1/releases/{release}", "one release with its bundles"),
        Page(
            "telemetry",
            "/ui/telemetry?model=digits&hours=24",
            f"/api/v1/telemetry/summary?model_name=digits&since={since_q}",
            "24 h summary per release x profile with drift",
        ),
        Page("audit", "/ui/audit", "/api/v1/audit?limit=50", "one page of the audit log"),
    ]


def _bundles(work: Path) -> tuple[Path, list[Path]]:
    from bench.dashboard_seed import MODEL, PROFILES, reference_stats
    from edgeota_contract.bundle import create_bundle
    from edgeota_contract.manifest import Lineage
    from edgeota_contract.signing import SigningKey, write_keypair

    key = SigningKey.generate()
    _, pub = write_keypair(work / "release.pem", key)
    out = []
    for n, version in enumerate(("1.0.0", "1.1.0")):
        for profile in PROFILES:
            path = work / f"{MODEL}-{version}-{profile}.bundle.tar"
            create_bundle(
                path,
                {
                    "model.onnx": f"model {version} {profile}".encode() * 100,
                    "reference_stats.json": reference_stats(),
                    "test_vectors.npz": b"v",
                    "model_card.md": f"# {MODEL} {version}\n\nBenchmark bundle.\n".encode(),
                },
                key,
                model_name=MODEL,
                version=version,
                release_counter=1_000_000 + 1_000 * n,
                hardware_profile=profile,
                inputs=[{"name": "x", "dtype": "float32", "shape": [None, 16]}],
                outputs=[{"name": "y", "dtype": "float32", "shape": [None, 10]}],
                opset=17,
                execution_provider="CPUExecutionProvider",
                recipe="int8-qdq",
                metrics={"accuracy": 0.97 - 0.01 * n, "size_ratio": 0.26},
                lineage=Lineage(
                    source_model_sha256="a" * 64,
                    packager_version="bench",
                    created_at=datetime.now(UTC),
                    created_by="bench",
                ),
            )
            out.append(path)
    return pub, out


class Server:
    """``edgeota server run`` on ``db_url`` with MQTT and the engine off; start/stop as often as needed."""

    def __init__(self, work: Path, db_url: str, pub: Path) -> None:
        from bench.server_bench import _free_port

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_DATA_DIR": str(work / "data"),
            "EDGEOTA_SERVER_ADMIN_TOKEN": ADMIN,
            "EDGEOTA_SERVER_RELEASE_KEYS": str(pub),
            "EDGEOTA_SERVER_MQTT_ENABLED": "false",
            "EDGEOTA_SERVER_ENGINE_ENABLED": "false",
            "EDGEOTA_SERVER_TUF_ENABLED": "false",
            "EDGEOTA_SERVER_LOG_LEVEL": "WARNING",
            "EDGEOTA_SERVER_PUBLIC_URL": self.url,
        }
        self.log = work / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = str(Path(sys.executable).with_name("edgeota"))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [exe, "server", "run", "--port", str(self.port)], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def sign_in(client: httpx.Client, token: str) -> None:
    """The login form as a browser fills it (its CSRF field and cookie); raises when no session cookie comes back."""
    form = client.get("/ui/login")
    form.raise_for_status()
    match = CSRF.search(form.text)
    if match is None:
        raise RuntimeError("no csrf field on /ui/login")
    csrf = html.unescape(match.group(1) or match.group(2))
    resp = client.post("/ui/login", data={"token": token, "csrf": csrf, "next": "/ui/"}, follow_redirects=False)
    if resp.status_code != 303 or "edgeota_ui" not in client.cookies:
        raise RuntimeError(f"sign-in failed: HTTP {resp.status_code}")


def _server_ms(resp: httpx.Response) -> float | None:
    """The largest ``dur`` in the response's ``Server-Timing`` header, or None without one."""
    durs = [float(m) for m in re.findall(r"dur=([0-9.]+)", resp.headers.get("server-timing", ""))]
    return max(durs) if durs else None


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def measure(client: httpx.Client, paths: list[str], repeat: int, headers: dict[str, str]) -> dict[str, Any]:
    """``repeat`` sequential GETs cycling through ``paths`` after one cold request; times in ms.

    A page that does not answer 200 (or breaks the connection) is reported with its status, not timed.
    """
    for attempt in range(2):  # a connection the server closed after an earlier page's error: once more, anew
        try:
            return _measure(client, paths, repeat, headers)
        except httpx.TransportError as exc:
            if attempt:
                return {"status": None, "error": repr(exc)}
        except httpx.HTTPError as exc:
            return {"status": None, "error": repr(exc)}
    raise AssertionError("unreachable")


def _measure(client: httpx.Client, paths: list[str], repeat: int, headers: dict[str, str]) -> dict[str, Any]:
    started = time.perf_counter()
    first = client.get(paths[0], headers=headers)
    cold = (time.perf_counter() - started) * 1000
    if first.status_code != 200:
        return {"status": first.status_code, "error": first.text.splitlines()[0][:200] if first.text else ""}
    client_ms: list[float] = []
    server_ms: list[float] = []
    sizes: list[int] = []
    for i in range(repeat):
        started = time.perf_counter()
        resp = client.get(paths[i % len(paths)], headers=headers)
        client_ms.append((time.perf_counter() - started) * 1000)
        if resp.status_code != 200:
            return {"status": resp.status_code, "error": f"request {i}: HTTP {resp.status_code}"}
        sizes.append(len(resp.content))
        st = _server_ms(resp)
        if st is not None:
            server_ms.append(st)
    timed = server_ms if len(server_ms) == len(client_ms) else client_ms
    return {
        "status": 200,
        "timing": "server-timing header" if timed is server_ms else "client over loopback",
        "p50_ms": _pct(timed, 0.5),
        "p95_ms": _pct(timed, 0.95),
        "max_ms": round(max(timed), 2),
        "cold_ms": round(cold, 2),
        "client_p50_ms": _pct(client_ms, 0.5),
        "client_p95_ms": _pct(client_ms, 0.95),
        "bytes": max(sizes),
        "requests": repeat,
    }


def run_one(db_url: str, devices: int, hours: int, repeat: int) -> dict[str, Any]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from bench.dashboard_seed import seed

    with tempfile.TemporaryDirectory(prefix="edgeota-dash-bench-") as tmp:
        work = Path(tmp)
        if db_url == "sqlite":
            db_url = f"sqlite:///{work / 'bench.db'}"
        pub, bundle_paths = _bundles(work)
        server = Server(work, db_url, pub)
        server.start()  # migrates the empty database; the releases go through the API
        try:
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as api:
                for path in bundle_paths:
                    resp = api.post(
                        "/api/v1/bundles",
                        content=path.read_bytes(),
                        headers={"Content-Type": "application/octet-stream"},
                    )
                    resp.raise_for_status()
        finally:
            server.stop()
        started = time.perf_counter()
        engine = create_engine(db_url)
        now = datetime.now(UTC)
        with Session(engine) as session, session.begin():
            seeded = seed(session, devices, hours, now)
        engine.dispose()
        seed_s = time.perf_counter() - started
        print(f"{db_url.split(':')[0]}: seeded {seeded.rows} in {seed_s:.0f} s", flush=True)
        server.start()
        out: dict[str, Any] = {
            "devices": devices,
            "hours": hours,
            "rows": seeded.rows,
            "seed_seconds": round(seed_s, 1),
        }
        try:
            bearer = {"Authorization": f"Bearer {ADMIN}"}
            with httpx.Client(base_url=server.url, timeout=120) as client:
                out["healthz_baseline"] = measure(client, ["/healthz"], repeat, {})
                try:
                    sign_in(client, ADMIN)
                    signed_in = True
                except (RuntimeError, httpx.HTTPError) as exc:
                    out["sign_in_error"] = str(exc)
                    signed_in = False
                release = seeded.releases[max(seeded.releases)]
                some = seeded.devices[:: max(1, len(seeded.devices) // 20)][:20]
                results = {}
                for page in pages(seeded, now - timedelta(hours=hours)):

                    def paths(template: str) -> list[str]:
                        if "{device}" in template:
                            return [template.replace("{device}", d) for d in some]
                        return [template.replace("{release}", release)]

                    ui = measure(client, paths(page.ui), repeat, {}) if signed_in else {"status": None}
                    twin = measure(client, paths(page.api), repeat, bearer)
                    print(f"  {page.name}: page p95 {ui.get('p95_ms')} ms, api p95 {twin.get('p95_ms')} ms", flush=True)
                    results[page.name] = {
                        "page": page.ui,
                        "page_result": ui,
                        "api": page.api,
                        "api_note": page.api_note,
                        "api_result": twin,
                        "goal": _verdict(ui),
                    }
                out["pages"] = results
        except Exception as exc:  # the server's own account is what explains a failed request
            raise RuntimeError(f"{exc!r}; server log: {server.log.read_text()[-1500:]}") from exc
        finally:
            server.stop()
    return out


def _verdict(result: dict[str, Any]) -> str:
    if result.get("status") != 200:
        return f"not measured (HTTP {result.get('status')})"
    return "met" if result["p95_ms"] < GOAL_P95_MS else "missed"


def run(results_dir: Path, quick: bool, databases: tuple[str, ...] = ("sqlite", "postgresql")) -> dict[str, Any]:
    """The benchmark on each database; writes ``results_dir / "dashboard.json"`` and returns its content."""
    from bench.server_bench import _with_pg_database

    devices, hours, repeat = (1_000, 24, 10) if quick else (10_000, 24, 30)
    result: dict[str, Any] = {
        "setting": {"quick": quick, "devices": devices, "hours": hours, "repeat": repeat, "goal_p95_ms": GOAL_P95_MS},
        "started_at": datetime.now(UTC).isoformat(),
    }
    for database in databases:
        load_before = [round(x, 2) for x in os.getloadavg()]
        try:
            if database == "sqlite":
                result[database] = run_one("sqlite", devices, hours, repeat)
            else:
                result[database] = _with_pg_database(lambda url: run_one(url, devices, hours, repeat))
        except Exception as exc:  # one database failing must not hide the other's figures
            result[database] = {"error": repr(exc)}
        # Other jobs on the machine slow every figure: the 1/5/15-minute load averages around this database's run.
        result[database]["load_average"] = {"start": load_before, "end": [round(x, 2) for x in os.getloadavg()]}
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "dashboard.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1,000 devices and 10 requests per page")
    parser.add_argument("--database", action="append", choices=["sqlite", "postgresql"], help="default: both")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for dashboard.json")
    args = parser.parse_args(argv)
    out = run(args.out, args.quick, tuple(args.database or ("sqlite", "postgresql")))
    for database in args.database or ("sqlite", "postgresql"):
        for name, page in out.get(database, {}).get("pages", {}).items():
            ui, api = page["page_result"], page["api_result"]
            print(
                f"{database:10} {name:13} page p95 {ui.get('p95_ms', '-'):>8} ms  api p95 {api.get('p95_ms', '-'):>8} ms  {page['goal']}"
            )
        if "error" in out.get(database, {}):
            print(f"{database}: {out[database]['error']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
