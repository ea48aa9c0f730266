"""A fleet for the dashboard benchmark, written straight into the server's database (bulk inserts, no API).

:func:`seed` adds, on top of the releases the benchmark uploaded through the API: ``devices`` devices over two
hardware profiles and four cohorts (90% online), what each one runs, a completed rollout of the old release to
every device and a running one of the new release (stage 3 of 3: committed, failed, rolled back, in progress,
notified and not yet assigned devices, with their status events), an audit trail, and ``hours`` of telemetry:
the aggregates the ingest path keeps (release x profile x cohort x 5-minute bucket, built by the production merge
code), each device's latest window per bundle, and each device's last hour of windows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

N_FEATURES = 16
EDGES = [i / 8 for i in range(1, 16)]
PROFILES = ("x86", "arm64")
COHORTS = ("north", "south", "east", "west")
WINDOW_MINUTES = 5
MODEL = "digits"
CHUNK = 2_000


@dataclass(frozen=True)
class Seeded:
    rollout_running: str
    rollout_done: str
    devices: list[str]
    releases: dict[str, str]  # version -> release id
    rows: dict[str, int]


def reference_stats() -> bytes:
    """``reference_stats.json`` for the bundles: 16 features on the same edges the telemetry uses."""
    from edgeota_contract.telemetry import FeatureReference, ReferenceStats

    counts = [100 + 10 * i for i in range(len(EDGES) + 1)]
    ref = ReferenceStats(
        sample_count=sum(counts),
        features=[FeatureReference(input="x", feature=f, edges=EDGES, counts=counts) for f in range(N_FEATURES)],
    )
    return ref.model_dump_json().encode()


def _window(seq: int, version: str, sha: str, end: datetime, features: bool, shift: int = 0) -> dict[str, Any]:
    from edgeota_contract.messages import TelemetryWindow
    from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS, FeatureSummary, OutputSummary

    return TelemetryWindow(
        boot_id="bench",
        seq=seq,
        model_name=MODEL,
        version=version,
        bundle_sha256=sha,
        window_start=end - timedelta(minutes=WINDOW_MINUTES),
        window_end=end,
        request_count=600,
        error_count=seq % 3,
        latency_counts=[(i * 7 + seq) % 50 for i in range(len(LATENCY_EDGES_MS) + 1)],
        features=[
            FeatureSummary(
                input="x",
                feature=f,
                edges=EDGES,
                counts=[100 + 10 * ((i + (shift if f == 3 else 0)) % (len(EDGES) + 1)) for i in range(len(EDGES) + 1)],
            )
            for f in range(N_FEATURES)
        ]
        if features
        else [],
        outputs=[
            OutputSummary(
                output="y",
                class_counts=[(c + seq) % 70 for c in range(10)],
                confidence_counts=[(c * 3 + seq) % 40 for c in range(len(CONFIDENCE_EDGES) + 1)],
            )
        ]
        if features
        else [],
    ).model_dump(mode="json")


def _bulk(session: Session, model: Any, rows: list[dict[str, Any]]) -> int:
    for i in range(0, len(rows), CHUNK):
        session.execute(insert(model), rows[i : i + CHUNK])
    return len(rows)


def seed(session: Session, devices: int, hours: int, now: datetime | None = None) -> Seeded:
    """Write the fleet (see the module docstring) in the caller's transaction; the releases must exist."""
    from ota_server.models import (
        AuditEntry,
        Bundle,
        Deployment,
        Device,
        DeviceModel,
        Release,
        Rollout,
        StatusEvent,
        TelemetryDevice,
        TelemetryRecord,
    )
    from ota_server.rollout.plan import Gates, Plan, Stage
    from ota_server.services.telemetry_aggregates import AggregateBatch, AggregationConfig, add_windows, flush

    rng = random.Random(7)
    now = now or datetime.now(UTC)
    releases = {r.version: r.id for r in session.scalars(select(Release).where(Release.model_name == MODEL))}
    old, new = sorted(releases, key=lambda v: tuple(int(p) for p in v.split(".")))[:2]
    bundles = {(b.version, b.hardware_profile): b for b in session.scalars(select(Bundle))}
    ids = [f"dev-{i:05d}" for i in range(devices)]
    profile = {d: PROFILES[i % len(PROFILES)] for i, d in enumerate(ids)}
    cohort = {d: COHORTS[(i // 2) % len(COHORTS)] for i, d in enumerate(ids)}
    rows: dict[str, int] = {}

    rows["devices"] = _bulk(
        session,
        Device,
        [
            {
                "id": d,
                "hardware_profile": profile[d],
                "labels": {"cohort": cohort[d], "ring": str(i % 10)},
                "token_hash": "-",
                "mqtt_password_hash": "-",
                "created_at": now - timedelta(days=3),
                "last_seen": now - timedelta(seconds=rng.randint(1, 120) if i % 10 else 3600 * 6),
                "presence_online": bool(i % 10),
                "boot_id": "bench",
                "agent_version": "0.1.0",
            }
            for i, d in enumerate(ids)
        ],
    )

    # The running rollout: stage 3 of 3; devices by outcome (the last 10% not assigned yet).
    outcome: dict[str, str] = {}
    for i, d in enumerate(ids):
        r = (i * 37) % 100
        outcome[d] = (
            "committed"
            if r < 60
            else "failed"
            if r < 63
            else "rolled_back"
            if r < 65
            else rng.choice(("downloading", "installing", "trial"))
            if r < 80
            else "notified"
            if r < 90
            else ""
        )
    running_on = {d: new if outcome[d] == "committed" else old for d in ids}
    rows["device_models"] = _bulk(
        session,
        DeviceModel,
        [
            {
                "device_id": d,
                "model_name": MODEL,
                "version": running_on[d],
                "bundle_sha256": bundles[(running_on[d], profile[d])].sha256,
                "release_counter": bundles[(running_on[d], profile[d])].release_counter,
                "previous_version": old if running_on[d] == new else None,
                "previous_bundle_sha256": bundles[(old, profile[d])].sha256 if running_on[d] == new else None,
                "updated_at": now - timedelta(hours=1),
            }
            for d in ids
        ],
    )
    plan_done = Plan(stages=(Stage(percent=100),))
    plan = Plan(
        stages=(Stage(percent=1), Stage(percent=10), Stage(percent=100)),
        gates=Gates(max_failure_rate=0.2, max_error_rate=0.05, max_drift_psi=0.25),
        on_failure="pause",
    )
    done_id, running_id = "r-bench-done", "r-bench-running"
    for rid, version, p, state, started in (
        (done_id, old, plan_done, "completed", now - timedelta(days=2)),
        (running_id, new, plan, "running", now - timedelta(hours=3)),
    ):
        session.add(
            Rollout(
                id=rid,
                release_id=releases[version],
                state=state,
                plan=p.to_json(),
                selector={"hardware_profiles": [], "labels": {}, "device_ids": []},
                targets=ids,
                current_stage=len(p.stages) - 1,
                stage_started_at=started + timedelta(minutes=30),
                created_at=started,
                updated_at=now - timedelta(minutes=1),
                created_by="bench",
                detail="all stages passed" if state == "completed" else "",
            )
        )
    session.flush()

    deployments: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for i, d in enumerate(ids):
        b_old, b_new = bundles[(old, profile[d])], bundles[(new, profile[d])]
        deployments.append(_deployment(f"dd{i:030d}", done_id, d, b_old, "committed", "ok", 0, now - timedelta(days=2)))
        if outcome[d]:
            dep_id = f"dr{i:030d}"
            reason = {"failed": "download_failed", "rolled_back": "smoke_test_failed"}.get(outcome[d], "ok")
            stage = 0 if i < devices // 100 else 1 if i < devices // 10 else 2
            at = now - timedelta(minutes=rng.randint(2, 170))
            deployments.append(_deployment(dep_id, running_id, d, b_new, outcome[d], reason, stage, at, b_old.sha256))
            for k, state in enumerate(("downloading", "installing", outcome[d])):
                if outcome[d] == "notified":
                    break
                events.append(
                    {
                        "device_id": d,
                        "deployment_id": dep_id,
                        "state": state,
                        "reason": reason if state == outcome[d] else "ok",
                        "at": at + timedelta(seconds=20 * k),
                    }
                )
    rows["deployments"] = _bulk(session, Deployment, deployments)
    rows["status_events"] = _bulk(session, StatusEvent, events)

    audit = [
        {
            "at": now - timedelta(days=3),
            "actor": "admin",
            "action": "device.provision",
            "entity_type": "device",
            "entity_id": d,
            "after": {"hardware_profile": profile[d], "labels": {"cohort": cohort[d]}},
        }
        for d in ids
    ]
    for rid, at in ((done_id, now - timedelta(days=2)), (running_id, now - timedelta(hours=3))):
        audit.append(
            {"at": at, "actor": "admin", "action": "rollout.create", "entity_type": "rollout", "entity_id": rid}
        )
        for s in range(3 if rid == running_id else 1):
            audit.append(
                {
                    "at": at + timedelta(minutes=30 * s),
                    "actor": "engine",
                    "action": "rollout.stage",
                    "entity_type": "rollout",
                    "entity_id": rid,
                    "after": {"current_stage": s},
                }
            )
    rows["audit_log"] = _bulk(session, AuditEntry, audit)

    rows["telemetry_devices"] = _bulk(
        session,
        TelemetryDevice,
        [
            {
                "device_id": d,
                "bundle_sha256": bundles[(running_on[d], profile[d])].sha256,
                "cohort": cohort[d],
                "last_window_end": now,
            }
            for d in ids
        ],
    )  # before the merge, which updates the rows of the devices it names
    # Telemetry: one window per (bundle, cohort) and bucket stands for all that group's devices (merging is
    # addition); feature 3 of the new release drifts, as a dashboard would want to show.
    config = AggregationConfig()
    per_group = hours * 60 // WINDOW_MINUTES
    end0 = now - timedelta(hours=hours)
    speaker = {(profile[d], cohort[d]): d for d in ids[:16]}
    groups = sorted(speaker)
    aggregates = 0
    for b in range(per_group):
        end = end0 + timedelta(minutes=WINDOW_MINUTES * (b + 1))
        batch = AggregateBatch()
        parts = []
        for version in (old, new):
            for g in groups:
                sha = bundles[(version, g[0])].sha256
                payload = _window(b, version, sha, end, features=True, shift=4 if version == new else 0)
                parts.append((speaker[g], payload, end, g[0], {"cohort": g[1]}, g[0]))
        add_windows(batch, parts, config)
        aggregates += flush(session, batch)
    rows["telemetry_aggregates"] = aggregates
    windows = []
    for d in ids:
        sha = bundles[(running_on[d], profile[d])].sha256
        for k in range(60 // WINDOW_MINUTES):
            end = now - timedelta(minutes=WINDOW_MINUTES * k)
            payload = _window(k, running_on[d], sha, end, features=False)
            windows.append(
                {
                    "device_id": d,
                    "boot_id": "bench",
                    "seq": k,
                    "model_name": MODEL,
                    "version": running_on[d],
                    "bundle_sha256": sha,
                    "window_start": end - timedelta(minutes=WINDOW_MINUTES),
                    "window_end": end,
                    "request_count": payload["request_count"],
                    "error_count": payload["error_count"],
                    "payload": payload,
                }
            )
        if len(windows) >= 50_000:
            rows["telemetry_windows"] = rows.get("telemetry_windows", 0) + _bulk(session, TelemetryRecord, windows)
            windows = []
    rows["telemetry_windows"] = rows.get("telemetry_windows", 0) + _bulk(session, TelemetryRecord, windows)
    return Seeded(running_id, done_id, ids, releases, rows)


def _deployment(
    dep_id: str,
    rollout: str,
    device: str,
    bundle: Any,
    state: str,
    reason: str,
    stage: int,
    at: datetime,
    previous: str | None = None,
) -> dict[str, Any]:
    return {
        "id": dep_id,
        "rollout_id": rollout,
        "device_id": device,
        "mode": "install",
        "stage": stage,
        "model_name": MODEL,
        "version": bundle.version,
        "bundle_sha256": bundle.sha256,
        "release_counter": bundle.release_counter,
        "previous_bundle_sha256": previous,
        "state": state,
        "reason": reason,
        "assignment_id": "a" + dep_id[2:],
        "send_count": 1,
        "attempt": 1,
        "created_at": at,
        "notified_at": at,
        "updated_at": at + timedelta(seconds=60),
    }
