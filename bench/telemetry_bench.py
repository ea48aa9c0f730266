"""Telemetry ingest and review at fleet scale (``python -m bench.run telemetry_bench``; JSON ``telemetry.json``).

1. **Ingest**: digits-shaped telemetry windows (16 features, classes, confidence) applied through the
   production path (:func:`ota_server.ingest_queue.apply_batch`: parse, dedupe look-up, window rows and the
   aggregate merge in one transaction per batch of 200), beside a bulk insert of the same window rows
   (``executemany`` of ``telemetry_windows`` alone: no parsing, no dedupe, no aggregates), on SQLite and
   on a throwaway PostgreSQL database. Windows per second over the batches' wall time overall, and this
   process's CPU per window (the database server's is not in it), which other load on the machine moves less.
   Only the payload bytes are held while ingest runs; the process freezes its startup objects as the server's
   writers do (:func:`ota_server.ingest_queue.freeze_startup_heap`). ``--ingest-only`` measures this part alone
   and keeps the review figures of the earlier run in the file (marked ``from_an_earlier_run``).
2. **Review** (p50/p95 of repeated queries, warm, and the first query ``cold_ms``): the fleet summary (``telemetry_summary`` over the aggregates, the API's default read) and the
   rollout gates' read (``gate_inputs`` for a drift + latency + error-rate plan) for N devices x 24 h of
   windows (one window per device per 5 minutes). The aggregate rows are built from the same windows the
   production merge builds; the window rows the summary's ``devices`` count reads are stored lean (the
   count reads only device, bundle and time); the repeated queries find the decoded rows cached
   (``read_aggregates``), the first one decodes every row.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

N_FEATURES = 16
EDGES = [i / 8 for i in range(1, 16)]
PROFILES = ("x86", "arm64")
COHORTS = ("north", "south", "east", "west")
WINDOW_MINUTES = 5


def _window_json(device: str, seq: int, sha: str, end: datetime) -> dict[str, Any]:
    from edgeota_contract.messages import TelemetryWindow
    from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS, FeatureSummary, OutputSummary

    return TelemetryWindow(
        boot_id="bench",
        seq=seq,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=sha,
        window_start=end - timedelta(minutes=WINDOW_MINUTES),
        window_end=end,
        request_count=600,
        error_count=seq % 3,
        latency_counts=[(i * 7 + seq) % 50 for i in range(len(LATENCY_EDGES_MS) + 1)],
        features=[
            FeatureSummary(input="x", feature=f, edges=EDGES, counts=[(f + i + seq) % 6 for i in range(len(EDGES) + 1)])
            for f in range(N_FEATURES)
        ],
        feature_requests=37,
        outputs=[
            OutputSummary(
                output="y",
                class_counts=[(c + seq) % 70 for c in range(10)],
                confidence_counts=[(c * 3 + seq) % 40 for c in range(len(CONFIDENCE_EDGES) + 1)],
            )
        ],
    ).model_dump(mode="json")


def _context(url: str, data_dir: Path) -> Any:
    from ota_server.core.config import Settings
    from ota_server.main import build_context

    settings = Settings(
        data_dir=data_dir,
        database_url=url,
        mqtt_enabled=False,
        engine_enabled=False,
        tuf_enabled=False,
        ingest_rate_per_device=1e9,
        ingest_burst_per_device=10**9,
    )
    return build_context(settings)


def _seed(ctx: Any, devices: int) -> dict[str, str]:
    """A release with one bundle per profile, and ``devices`` devices spread over profiles and cohorts."""
    from ota_server.models import Bundle, Device, Release

    shas = {p: f"{i + 1:064x}" for i, p in enumerate(PROFILES)}
    with ctx.sessions() as session, session.begin():
        session.add(Release(id="rel-bench", model_name="digits", version="1.0.0", created_by="bench"))
        session.flush()  # no ORM relationship orders the inserts
        for profile, sha in shas.items():
            session.add(
                Bundle(
                    sha256=sha,
                    release_id="rel-bench",
                    model_name="digits",
                    version="1.0.0",
                    hardware_profile=profile,
                    release_counter=1,
                    size=1,
                    signing_key_id="bench",
                    manifest={},
                )
            )
        session.add_all(
            Device(
                id=f"dev-{i:05d}",
                hardware_profile=PROFILES[i % len(PROFILES)],
                labels={"cohort": COHORTS[i % len(COHORTS)]},
                token_hash="-",
                mqtt_password_hash="-",
            )
            for i in range(devices)
        )
    return shas


def _ingest(url: str, windows: int, devices: int) -> dict[str, Any]:
    """Windows/s through apply_batch, and through a bulk insert of the same rows."""
    from sqlalchemy import insert

    from edgeota_contract.topics import Channel, device_topic
    from ota_server.ingest_queue import Incoming, apply_batch, freeze_startup_heap, writer_sessions
    from ota_server.models import TelemetryRecord

    with tempfile.TemporaryDirectory() as tmp:
        ctx = _context(url, Path(tmp))
        shas = _seed(ctx, devices)
        sessions, engine = writer_sessions(ctx)
        t0 = datetime.now(UTC)
        items = []
        for n in range(windows):
            device = f"dev-{n % devices:05d}"
            window = _window_json(device, n, shas[PROFILES[(n % devices) % len(PROFILES)]], t0 + timedelta(seconds=n))
            payload = json.dumps(window).encode()
            items.append(Incoming(device_topic(device, Channel.TELEMETRY), device, Channel.TELEMETRY, payload))
        # Only the payload bytes are held while ingest runs (as a server's queue holds them): thousands of decoded
        # windows kept alive would make every full garbage collection of the measured path walk them. The
        # server's writers freeze what exists when they start; so does this process, once.
        freeze_startup_heap()
        gc.collect()
        started, cpu = time.perf_counter(), time.thread_time()
        for i in range(0, len(items), 200):
            outcomes = apply_batch(ctx, sessions, items[i : i + 200])
            assert set(outcomes) == {"ok"}, set(outcomes)
        ingest_s, ingest_cpu = time.perf_counter() - started, time.thread_time() - cpu
        payloads = [(item.device_id, json.loads(item.payload)) for item in items]
        rows = [
            {
                "device_id": d,
                "boot_id": "bulk",
                "seq": w["seq"],
                "model_name": w["model_name"],
                "version": w["version"],
                "bundle_sha256": w["bundle_sha256"],
                "window_start": datetime.fromisoformat(w["window_start"]),
                "window_end": datetime.fromisoformat(w["window_end"]),
                "request_count": w["request_count"],
                "error_count": w["error_count"],
                "payload": w,
            }
            for d, w in payloads
        ]
        started, cpu = time.perf_counter(), time.thread_time()
        for i in range(0, len(rows), 200):
            with ctx.sessions() as session, session.begin():
                session.execute(insert(TelemetryRecord), rows[i : i + 200])
        bulk_s, bulk_cpu = time.perf_counter() - started, time.thread_time() - cpu
        if engine is not None:
            engine.dispose()
        ctx.engine.dispose()
    return {
        "windows": windows,
        "devices": devices,
        "ingest_windows_per_s": round(windows / ingest_s),
        "bulk_insert_windows_per_s": round(windows / bulk_s),
        "ingest_seconds": round(ingest_s, 2),
        "bulk_insert_seconds": round(bulk_s, 2),
        # this process's CPU per window (the database server's is not in it): less sensitive to other load
        "ingest_cpu_us_per_window": round(1e6 * ingest_cpu / windows),
        "bulk_insert_cpu_us_per_window": round(1e6 * bulk_cpu / windows),
    }


def _percentiles(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    started = time.perf_counter()
    fn()  # cold: no decoded aggregate row cached yet (the first review after a start)
    cold = (time.perf_counter() - started) * 1000
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {
        "p50_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
        "cold_ms": round(cold, 1),
        "runs": repeat,
    }


def _review(url: str, devices: int, hours: int, repeat: int) -> dict[str, Any]:
    """Summary and gate-read time for ``devices`` x ``hours`` of 5-minute windows."""
    from sqlalchemy import insert

    from ota_server.models import Rollout, TelemetryRecord
    from ota_server.rollout.plan import Gates, Plan, Stage
    from ota_server.services.telemetry import gate_inputs
    from ota_server.services.telemetry_aggregates import AggregateBatch, AggregationConfig, add_windows, flush
    from ota_server.services.telemetry_summary import telemetry_summary

    per_device = hours * 60 // WINDOW_MINUTES
    with tempfile.TemporaryDirectory() as tmp:
        ctx = _context(url, Path(tmp))
        shas = _seed(ctx, devices)
        end0 = datetime(2026, 6, 1, tzinfo=UTC)
        config = AggregationConfig()
        started = time.perf_counter()
        # One window per (profile, cohort) and bucket stands for all the devices of that group: merging is
        # addition, so the aggregate rows are those of the full fleet up to the counts' scale.
        device_of = {(PROFILES[i % len(PROFILES)], COHORTS[i % len(COHORTS)]): f"dev-{i:05d}" for i in range(8)}
        groups = sorted(device_of)  # the (profile, cohort) pairs the fleet has
        for b in range(per_device):
            batch = AggregateBatch()
            end = end0 + timedelta(minutes=WINDOW_MINUTES * b)
            add_windows(
                batch,
                (
                    (device_of[g], _window_json(device_of[g], b, shas[g[0]], end), end, g[0], {"cohort": g[1]}, g[0])
                    for g in groups
                ),
                config,
            )
            with ctx.sessions() as session, session.begin():
                flush(session, batch)
        lean = {"kind": "telemetry"}
        total = 0
        for b in range(per_device):
            end = end0 + timedelta(minutes=WINDOW_MINUTES * b)
            rows = [
                {
                    "device_id": f"dev-{i:05d}",
                    "boot_id": "review",
                    "seq": b,
                    "model_name": "digits",
                    "version": "1.0.0",
                    "bundle_sha256": shas[PROFILES[i % 2]],
                    "window_start": end - timedelta(minutes=WINDOW_MINUTES),
                    "window_end": end,
                    "request_count": 600,
                    "error_count": 0,
                    "payload": lean,
                }
                for i in range(devices)
            ]
            with ctx.sessions() as session, session.begin():
                session.execute(insert(TelemetryRecord), rows)
            total += len(rows)
        build_s = time.perf_counter() - started
        plan = Plan(
            stages=(Stage(percent=100),),
            gates=Gates(max_error_rate=0.05, max_p95_latency_ratio=1.5, max_drift_psi=0.25),
        )
        rollout = Rollout(id="r-bench", release_id="rel-bench", plan=plan.to_json(), targets=[], created_by="bench")

        def summary() -> None:
            with ctx.sessions() as session:
                out = telemetry_summary(session, ctx.store, model_name="digits", since=end0, config=config)
                assert out["source"] == "aggregates" and out["groups"]

        def gates() -> None:
            with ctx.sessions() as session:
                gate_inputs(session, ctx.store, rollout, plan)

        result = {
            "devices": devices,
            "hours": hours,
            "windows": total,
            "aggregate_rows": per_device * len(groups),
            "build_seconds": round(build_s, 1),
            "summary": _percentiles(summary, repeat),
            "gate_read": _percentiles(gates, repeat),
        }
        ctx.engine.dispose()
    return result


def _on_each_database(fn: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from bench.server_bench import _with_pg_database

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["sqlite"] = fn(f"sqlite:///{tmp}/bench.db")
    try:
        out["postgresql"] = _with_pg_database(fn)
    except Exception as exc:  # no PostgreSQL reachable: say so, keep the SQLite figures
        out["postgresql"] = {"error": repr(exc)}
    return out


def _met(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each goal met (True), missed (False) or not measured (None)."""
    pg_ingest = result["ingest"].get("postgresql", {}).get("ingest_windows_per_s")
    p95s = [r["summary"]["p95_ms"] for r in result["review"].values() if isinstance(r, dict) and "summary" in r]
    return {
        "ingest_windows_per_s_postgresql": None if pg_ingest is None else pg_ingest >= 5000,
        "review_p95_ms": None if not p95s else max(p95s) < 200,
    }


def run(results_dir: Path, quick: bool, ingest_only: bool = False) -> dict[str, Any]:
    """Both measurements on both databases; writes ``results_dir / "telemetry.json"`` and returns its content.

    ``ingest_only``: measure ingest alone and keep the review figures of the file's earlier run (marked so).
    """
    windows, ingest_devices = (2_000, 200) if quick else (20_000, 2_000)
    devices, hours, repeat = (1_000, 24, 10) if quick else (10_000, 24, 30)
    load_before = os.getloadavg()[0]
    ingest = _on_each_database(lambda url: _ingest(url, windows, ingest_devices))
    load_after = os.getloadavg()[0]
    earlier = results_dir / "telemetry.json"
    if ingest_only and earlier.exists():
        review = json.loads(earlier.read_text()).get("review", {})
        review["from_an_earlier_run"] = True
    else:
        review = _on_each_database(lambda url: _review(url, devices, hours, repeat))
    result: dict[str, Any] = {
        "setting": {
            "quick": quick,
            "features": N_FEATURES,
            "window_minutes": WINDOW_MINUTES,
            "batch": 200,
            "postgres_admin_url": bool(os.environ.get("EDGEOTA_TEST_PG_URL")),
            "load_average_1min_ingest": [round(load_before, 2), round(load_after, 2)],
        },
        "ingest": ingest,
        "review": review,
        "goals": {"ingest_windows_per_s_postgresql": 5000, "review_p95_ms": 200},
    }
    result["met"] = _met(result)
    if earlier.exists() and "ingest_processes" in (kept := json.loads(earlier.read_text())):
        result["ingest_processes"] = kept["ingest_processes"]  # its own invocation (--processes)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "telemetry.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def ingest_processes(results_dir: Path, devices: int, windows: int, counts: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Real Mosquitto, PostgreSQL and ``edgeota server ingest`` processes: 1, then 2, in this one invocation.

    Each run: ``edgeota server run`` (publishing only) and that many ingest processes of one shared-subscription
    group; every device's reports published at once (:func:`bench.server_ingest.run_ingest`); messages per second
    from the first publish to the last ack (acks follow the commit), sent = stored, none doubled. Merged into
    ``telemetry.json`` under ``ingest_processes``.
    """
    from bench.server_bench import _with_pg_database
    from bench.server_ingest import INGEST_AFTER, merge, run_ingest

    runs = []
    for n in counts:
        runs.append(_with_pg_database(lambda url, n=n: run_ingest(url, devices, windows, INGEST_AFTER, None, n)))
        print(json.dumps(runs[-1]), flush=True)
    report = {
        "setup": f"{devices} devices x (presence, check-in, 4 status reports, {windows} telemetry windows, every 5th "
        "window re-sent), published at once over 4 connections (QoS 1); publisher, Mosquitto, the server, the "
        "ingest processes and PostgreSQL share the machine's 2 cores",
        "goal_messages_per_s_2_processes": 5000,
        "runs": runs,
        "met": any(r["ingest_processes"] == 2 and r["messages_per_s"] >= 5000 for r in runs),
    }
    merge(results_dir / "telemetry.json", "ingest_processes", report)
    return report


if __name__ == "__main__":
    import sys

    results = Path(__file__).with_name("results")
    if "--processes" in sys.argv:
        print(json.dumps(ingest_processes(results, 200 if "--quick" in sys.argv else 500, 8), indent=2))
    else:
        print(json.dumps(run(results, "--quick" in sys.argv, ingest_only="--ingest-only" in sys.argv), indent=2))
