"""The batch writers' bulk path for telemetry windows (one insert per batch) on SQLite and PostgreSQL.

Each window is stored once (by msg id and by device, boot and seq), the aggregates equal the stored
windows merged again, a malformed or failing message loses nothing else, and a window stored by another
transaction between the batch's look-up and its insert sends the batch to the careful pass, which finds it.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, insert, select
from sqlalchemy.orm import Session

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS, FeatureSummary, OutputSummary, ShadowSummary
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.ingest_queue import Incoming, apply_batch
from ota_server.models import TelemetryRecord
from ota_server.rollout.telemetry_gates import TelemetryTotals, merge_all
from ota_server.services import ingest_prefetch
from ota_server.services.telemetry_aggregates import AggregationConfig, parsed_window_part, window_part
from ota_server.services.telemetry_rows import window_columns

from .conftest import AUTH, BundleFactory, upload
from .helpers import _sessions, acked
from .test_telemetry_aggregates import _devices, _expected, _expected_devices, _stored

END = datetime(2026, 5, 1, 10, 1, tzinfo=UTC)  # every window of these tests ends in the same 5-minute bucket


def _window(
    rng: np.random.Generator, sha: str, seq: int, boot: str = "boot-a", shadow: bool = False
) -> TelemetryWindow:
    n = int(rng.integers(50, 300))
    return TelemetryWindow(
        boot_id=boot,
        seq=seq,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=sha,
        window_start=END - timedelta(minutes=1),
        window_end=END + timedelta(seconds=seq % 60),
        request_count=n,
        error_count=int(rng.integers(0, 5)),
        latency_counts=[int(c) for c in rng.integers(0, 20, len(LATENCY_EDGES_MS) + 1)],
        features=[
            FeatureSummary(input="x", feature=j, edges=[-1.0, 0.0, 1.0], counts=[int(c) for c in rng.integers(0, 9, 4)])
            for j in range(4)
        ],
        outputs=[
            OutputSummary(
                output="y",
                class_counts=[int(c) for c in rng.integers(0, 30, 3)],
                confidence_counts=[int(c) for c in rng.integers(0, 9, 12)],
                nan_count=seq % 2,
            ),
            OutputSummary(output="z", nan_count=1),  # no class counts: only its NaN count is merged
        ],
        shadow=ShadowSummary(candidate_version="1.1.0", candidate_bundle_sha256="c" * 64, compared=n, top1_agree=n - 1)
        if shadow
        else None,
        spool_dropped=seq % 3,
    )


def _item(device: str, message: TelemetryWindow | bytes) -> Incoming:
    payload = message if isinstance(message, bytes) else message.model_dump_json().encode()
    return Incoming(device_topic(device, Channel.TELEMETRY), device, Channel.TELEMETRY, payload)


def _register(client: TestClient, devices: dict[str, str]) -> None:
    for device, cohort in devices.items():
        body = {"device_id": device, "hardware_profile": "x86", "labels": {"cohort": cohort}}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201


def _windows(ctx: ServerContext) -> list[TelemetryRecord]:
    with ctx.sessions() as session:
        return list(session.scalars(select(TelemetryRecord).order_by(TelemetryRecord.id)))


def test_one_batch_stores_each_window_once_and_its_aggregates_equal_the_windows(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    rng = np.random.default_rng(3)
    sha = upload(client, make_bundle("1.0.0", "x86")).json()["bundle_sha256"]
    _register(client, {"d1": "north", "d2": "north", "d3": "south"})
    sent = [(f"d{i % 3 + 1}", _window(rng, sha if i % 4 else "f" * 64, i, shadow=i % 5 == 0)) for i in range(12)]
    items = [_item(d, w) for d, w in sent]
    redelivered = items[2]  # the same message twice in one batch
    same_window = sent[3][1].model_copy(update={"msg_id": "another-msg-id"})  # re-sent under a new msg id
    malformed = _item("d1", b'{"kind": "telemetry", "boot_id": "boot-a"')
    bad_histogram = json.loads(sent[4][1].model_dump_json())
    bad_histogram.update(seq=99, msg_id="bad-histogram")
    bad_histogram["features"][0]["edges"] = [1.0, 0.0, -1.0]  # not ascending: the contract refuses it
    ghost = _item("ghost", _window(rng, sha, 50))
    batch = [*items[:6], redelivered, malformed, _item("d1", json.dumps(bad_histogram).encode()), ghost]
    batch += [*items[6:], _item(sent[3][0], same_window)]

    outcomes = apply_batch(ctx, _sessions(ctx), batch)

    assert outcomes == [*["ok"] * 6, "duplicate", "malformed", "malformed", "unknown_device", *["ok"] * 6, "duplicate"]
    stored = _windows(ctx)
    assert sorted((w.device_id, w.seq) for w in stored) == sorted((d, w.seq) for d, w in sent)
    by_key = {(w.device_id, w.seq): w for w in stored}
    for device, w in sent:  # the stored payload is the validated window's JSON form, nothing else
        assert by_key[(device, w.seq)].payload == w.model_dump(mode="json")
        assert by_key[(device, w.seq)].window_end == w.window_end
    aggregates = _stored(ctx)
    assert aggregates == _expected(ctx, AggregationConfig())
    # one bucket; 2 cohorts x (known bundle, unknown bundle), plus 3 rows of windows that shadowed a candidate
    assert len(aggregates) == 7
    assert sum(t.windows for t in aggregates.values()) == len(sent)
    assert _devices(ctx) == _expected_devices(ctx)
    assert acked(ctx, "d1") >= {w.msg_id for d, w in sent if d == "d1"}
    assert "bad-histogram" not in acked(ctx, "d1")
    assert ctx.metrics.snapshot().get("ingest_batch_redone", 0) == 0  # nothing failed once parsed: one pass

    # the whole lot again, spread over two batches: nothing is stored or counted twice
    assert set(apply_batch(ctx, _sessions(ctx), items[:5])) == {"duplicate"}
    assert set(apply_batch(ctx, _sessions(ctx), items[5:])) == {"duplicate"}
    assert len(_windows(ctx)) == len(sent) and _stored(ctx) == aggregates


def test_a_window_stored_meanwhile_sends_the_batch_to_the_careful_pass(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    sha = upload(client, make_bundle("1.0.0", "x86")).json()["bundle_sha256"]
    _register(client, {"e1": "east", "e2": "west"})
    sent = [(f"e{i % 2 + 1}", _window(rng, sha, i)) for i in range(6)]
    raced_device, raced = sent[2]
    real_prefetch = ingest_prefetch.prefetch
    url = ctx.engine.url.render_as_string(hide_password=False)
    postgres = url.startswith("postgresql")
    calls: list[bool] = []

    def prefetch_then_race(session: Session, batch: list[Any], **kwargs: Any) -> ingest_prefetch.Known:
        """The batch's look-up, then another writer stores one of its windows before the batch's insert."""
        known = real_prefetch(session, batch, **kwargs)
        calls.append(bool(kwargs.get("bulk_windows")))
        if len(calls) == 1:
            row = {**window_columns(raced_device, raced), "payload": raced.model_dump(mode="json")}
            if postgres:  # another connection, committed: the careful pass finds it stored
                other = create_engine(url)
                with other.begin() as conn:
                    conn.execute(insert(TelemetryRecord), [row])
                other.dispose()
            else:  # one writer at a time: the same transaction, which the failed fast pass rolls back
                session.execute(insert(TelemetryRecord), [row])
        return known

    monkeypatch.setattr(ingest_prefetch, "prefetch", prefetch_then_race)
    outcomes = apply_batch(ctx, _sessions(ctx), [_item(d, w) for d, w in sent])

    assert calls == [True, False]  # the bulk pass failed on the unique key; the careful pass committed
    assert outcomes == ["ok", "ok", "duplicate" if postgres else "ok", "ok", "ok", "ok"]
    assert ctx.metrics.snapshot().get("ingest_batch_redone") == 1
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TelemetryRecord)) == len(sent)
    if postgres:  # the raced copy was stored by the other writer, which adds it to the aggregates itself
        expected = TelemetryTotals()
        for device, w in sent:
            if w is not raced:
                expected.add_window_model(w, device)
        assert merge_all(_stored(ctx)) == expected and expected.windows == len(sent) - 1
    else:
        assert _stored(ctx) == _expected(ctx, AggregationConfig())
    assert acked(ctx, raced_device) >= {raced.msg_id}


def _payloads() -> list[TelemetryWindow]:
    rng = np.random.default_rng(21)
    windows = [_window(rng, "a" * 64, i, shadow=i % 2 == 0) for i in range(6)]
    # one window with two summaries of the same feature (the later one is merged) and an odd latency length
    twice = windows[0].model_copy(update={"features": [*windows[0].features, windows[0].features[0]]})
    odd = windows[1].model_copy(update={"latency_counts": [1, 2, 3]})
    return [*windows, twice, odd]


def test_a_parsed_window_adds_the_same_counts_as_its_json() -> None:
    from_json, from_model = TelemetryTotals(), TelemetryTotals()
    config = AggregationConfig(cohort_label="cohort", bucket_seconds=300)
    for i, w in enumerate(_payloads()):
        payload = w.model_dump(mode="json")
        from_json.add_window(payload, f"dev{i % 2}", attributed=i % 3 != 0)
        from_model.add_window_model(w, f"dev{i % 2}", attributed=i % 3 != 0)
        labels = {"cohort": "north"}
        a = window_part(payload, w.window_end, "d", "x86", labels, "arm64" if i % 2 else None, config)
        b = parsed_window_part(w, "d", "x86", labels, "arm64" if i % 2 else None, config)
        assert (a.key, a.model_name, a.version, a.attributed, a.shadow_version, a.window_end) == (
            b.key,
            b.model_name,
            b.version,
            b.attributed,
            b.shadow_version,
            b.window_end,
        )
    assert from_model == from_json
    assert from_model.windows == 8 and from_model.shadow_compared > 0 and from_model.dropped_by_device


def test_a_non_finite_value_is_stored_as_null_by_either_pass(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JSON has no NaN (PostgreSQL refuses a document with one): both passes store the same document."""
    rng = np.random.default_rng(4)
    sha = upload(client, make_bundle("1.0.0", "x86")).json()["bundle_sha256"]
    _register(client, {"n1": "north"})

    def with_nan(seq: int) -> TelemetryWindow:
        w = _window(rng, sha, seq)
        feature = w.features[0].model_copy(update={"min": float("nan"), "max": float("inf")})
        return w.model_copy(update={"features": [feature, *w.features[1:]]})

    fast = with_nan(1)
    assert apply_batch(ctx, _sessions(ctx), [_item("n1", fast)]) == ["ok"]
    real_flush = ingest_prefetch.flush_windows
    failures: list[int] = []

    def fail_once(session: Session, known: ingest_prefetch.Known) -> int:
        if not failures:
            failures.append(1)
            raise RuntimeError("the bulk insert failed")
        return real_flush(session, known)

    monkeypatch.setattr(ingest_prefetch, "flush_windows", fail_once)
    careful = with_nan(2)
    assert apply_batch(ctx, _sessions(ctx), [_item("n1", careful)]) == ["ok"]
    assert failures == [1] and ctx.metrics.snapshot().get("ingest_batch_redone") == 1
    stored = {w.seq: w.payload for w in _windows(ctx)}
    for w in (fast, careful):
        first = stored[w.seq]["features"][0]
        assert (first["min"], first["max"]) == (None, None)
        assert stored[w.seq]["features"][1:] == [f.model_dump(mode="json") for f in w.features[1:]]
    assert _stored(ctx) == _expected(ctx, AggregationConfig())
