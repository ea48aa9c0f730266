"""Fleet telemetry summary API and CLI over windows ingested through the real ingest path (both databases)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import (
    LATENCY_EDGES_MS,
    FeatureReference,
    FeatureSummary,
    OutputSummary,
    ReferenceStats,
    ShadowSummary,
)
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext

from .conftest import AUTH, BundleFactory, make_token, upload
from .helpers import deliver

EDGES = [-1.5, -0.5, 0.0, 0.5, 1.5]
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SHIFTED = 3  # feature 3 drifts in the field


def _hist(values: np.ndarray, edges: list[float] | tuple[float, ...]) -> list[int]:
    idx = np.searchsorted(np.asarray(edges), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(edges) + 1)]


def _reference(rng: np.random.Generator) -> tuple[bytes, list[list[int]]]:
    counts = [_hist(rng.normal(size=20_000), EDGES) for _ in range(4)]
    stats = ReferenceStats(
        sample_count=20_000,
        features=[FeatureReference(input="x", feature=j, edges=EDGES, counts=c) for j, c in enumerate(counts)],
    )
    return stats.model_dump_json().encode(), counts


class Fleet:
    """Raw per-window data kept beside what was sent, for the numpy reference."""

    def __init__(self, ctx: ServerContext, bundle_sha: str, rng: np.random.Generator) -> None:
        self.ctx, self.sha, self.rng = ctx, bundle_sha, rng
        self.seq = 0
        self.sent: list[dict[str, Any]] = []

    def send(self, device: str, start: datetime, n: int = 300, dropped: int = 0, shadow: bool = False) -> None:
        self.seq += 1
        latencies = self.rng.lognormal(mean=1.0, sigma=1.0, size=n)
        x = self.rng.normal(size=(n, 4))
        x[:, SHIFTED] += 1.5
        classes = self.rng.integers(0, 3, size=n)
        errors = int(self.rng.integers(0, 10))
        window = TelemetryWindow(
            boot_id=f"boot-{device}",
            seq=self.seq,
            model_name="digits",
            version="1.0.0",
            bundle_sha256=self.sha,
            window_start=start,
            window_end=start + timedelta(minutes=1),
            request_count=n,
            error_count=errors,
            latency_counts=_hist(latencies, LATENCY_EDGES_MS),
            features=[
                FeatureSummary(input="x", feature=j, edges=EDGES, counts=_hist(x[:, j], EDGES)) for j in range(4)
            ],
            outputs=[OutputSummary(output="y", class_counts=[int(c) for c in np.bincount(classes, minlength=3)])],
            shadow=ShadowSummary(
                candidate_version="1.1.0", candidate_bundle_sha256="c" * 64, compared=n, top1_agree=n - errors
            )
            if shadow
            else None,
            spool_dropped=dropped,
        )
        topic = device_topic(device, Channel.TELEMETRY)
        assert deliver(self.ctx, topic, window.model_dump_json().encode()) == "ok"
        self.sent.append(
            dict(device=device, lat=latencies, x=x, classes=classes, errors=errors, n=n, dropped=dropped, shadow=shadow)
        )


def _psi(expected: list[int], actual: np.ndarray, eps: float = 1e-4) -> float:
    pe = np.maximum(np.asarray(expected) / np.sum(expected), eps)
    pa = np.maximum(actual / actual.sum(), eps)
    return float(np.sum((pa - pe) * np.log(pa / pe)))


def _quantile(latencies: np.ndarray, q: float) -> float:
    cum = np.cumsum(_hist(latencies, LATENCY_EDGES_MS))
    i = int(np.searchsorted(cum, q * cum[-1], side="left"))
    return LATENCY_EDGES_MS[i] if i < len(LATENCY_EDGES_MS) else float("inf")


@pytest.fixture
def fleet(client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> tuple[Fleet, list[list[int]]]:
    rng = np.random.default_rng(7)
    reference, ref_counts = _reference(rng)
    resp = upload(client, make_bundle("1.0.0", "x86", reference=reference))
    assert resp.status_code == 201, resp.text
    for device, site in (("cam-1", "north"), ("cam-2", "south")):
        body = {"device_id": device, "hardware_profile": "x86", "labels": {"site": site}}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    f = Fleet(ctx, resp.json()["bundle_sha256"], rng)
    f.send("cam-1", T0, dropped=1, shadow=True)
    f.send("cam-1", T0 + timedelta(minutes=1), dropped=4)
    f.send("cam-2", T0, n=500, dropped=2, shadow=True)
    f.send("cam-2", T0 + timedelta(hours=1), n=200)
    return f, ref_counts


def _summary(client: TestClient, headers: dict[str, str] | None = None, **params: Any) -> Any:
    resp = client.get("/api/v1/telemetry/summary", params=params, headers=headers or AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_summary_matches_numpy_reference(client: TestClient, fleet: tuple[Fleet, list[list[int]]]) -> None:
    f, ref_counts = fleet
    viewer = make_token(client, "viewer")
    groups = _summary(client, viewer, model_name="digits", worst=10)["groups"]
    assert len(groups) == 1
    g = groups[0]
    assert (g["model_name"], g["version"], g["hardware_profile"]) == ("digits", "1.0.0", "x86")
    n = sum(w["n"] for w in f.sent)
    errors = sum(w["errors"] for w in f.sent)
    assert (g["requests"], g["errors"], g["devices"], g["windows"]) == (n, errors, 2, 4)
    assert g["error_rate"] == pytest.approx(errors / n)
    lat = np.concatenate([w["lat"] for w in f.sent])
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert g["latency_ms"][name] == _quantile(lat, q)
    x = np.concatenate([w["x"] for w in f.sent])
    psis = {d["feature"]: d for d in g["drift"]["features"]}
    for j in range(4):
        expected = _psi(ref_counts[j], np.asarray(_hist(x[:, j], EDGES), dtype=float))
        assert psis[j]["psi"] == pytest.approx(expected, rel=1e-9)
        assert (psis[j]["psi"] > 0.25) == (j == SHIFTED)
        assert psis[j]["label"] == psis[j]["level"] == ("drift" if j == SHIFTED else "stable")
        assert psis[j]["p_adjusted"] is not None and (psis[j]["p_adjusted"] < 1e-6) == (j == SHIFTED)
        assert 0 <= psis[j]["js_distance"] <= 1 and psis[j]["n"] == psis[j]["values"]
        assert psis[j]["values"] == int(np.isfinite(x[:, j]).sum())
        if j != SHIFTED:
            assert psis[j]["psi"] < 0.02  # reference-like data
    assert g["drift"]["features"][0]["feature"] == SHIFTED and g["drift"]["label"] == "drift"
    assert g["drift"]["max_psi"] == psis[SHIFTED]["psi"]
    classes = np.concatenate([w["classes"] for w in f.sent])
    assert g["outputs"]["y"]["class_counts"] == np.bincount(classes, minlength=3).tolist()
    shadowed = [w for w in f.sent if w["shadow"]]
    (shadow,) = g["shadow"]
    assert shadow["compared"] == sum(w["n"] for w in shadowed)
    assert shadow["agreement"] == pytest.approx(sum(w["n"] - w["errors"] for w in shadowed) / shadow["compared"])
    assert g["spool_dropped"] == 4 + 2  # per device the latest cumulative figure, summed
    assert g["attribution"] == {"requests": n, "attributed_requests": n, "coverage": 1.0}


def test_aggregates_and_windows_give_the_same_summary(client: TestClient, fleet: tuple[Fleet, list[list[int]]]) -> None:
    """The aggregate rows (no until, since on a bucket edge) and the windows (any filter) merge to the same groups."""
    by_aggregates = _summary(client, since=T0.isoformat())
    by_windows = _summary(client, since=T0.isoformat(), until="2030-01-01T00:00:00Z")
    assert (by_aggregates["source"], by_windows["source"]) == ("aggregates", "windows")
    assert by_aggregates["groups"] == by_windows["groups"] and by_aggregates["groups"]
    assert by_aggregates["attribution"]["coverage"] == 1.0


def test_summary_filters(client: TestClient, fleet: tuple[Fleet, list[list[int]]]) -> None:
    f, _ = fleet
    north = _summary(client, cohort="site=north")["groups"][0]
    assert north["requests"] == sum(w["n"] for w in f.sent if w["device"] == "cam-1") and north["devices"] == 1
    early = _summary(client, until=(T0 + timedelta(minutes=1)).isoformat())["groups"][0]
    assert early["windows"] == 2
    late = _summary(client, since="2026-03-01T00:30:00Z", worst=1)["groups"][0]
    assert late["windows"] == 1 and late["requests"] == 200 and len(late["drift"]["features"]) == 1
    assert _summary(client, profile="arm64")["groups"] == []
    assert _summary(client, version="2.0.0")["groups"] == []
    assert _summary(client, cohort="site=east")["groups"] == []


def test_summary_auth_and_bad_parameters(client: TestClient, fleet: tuple[Fleet, list[list[int]]]) -> None:
    url = "/api/v1/telemetry/summary"
    assert client.get(url).status_code == 401
    assert client.get(url, headers={"Authorization": "Bearer nope.nope"}).status_code == 401
    created = client.post("/api/v1/devices", json={"device_id": "cam-9", "hardware_profile": "x86"}, headers=AUTH)
    device = {"Authorization": f"Bearer {created.json()['token']}"}
    assert client.get(url, headers=device).status_code == 403
    bad = [
        {"since": "2026-03-02T00:00:00Z", "until": "2026-03-01T00:00:00Z"},
        {"since": "yesterday"},
        {"cohort": "site"},
        {"version": "1.0"},
        {"model_name": "../etc"},
        {"worst": 0},
        {"since": "0001-01-01T00:00:00+14:00"},
    ]
    for params in bad:
        resp = client.get(url, params=params, headers=AUTH)
        assert resp.status_code == 422, (params, resp.text)
        assert resp.headers["content-type"] == "application/problem+json"


def test_cli_summary(client: TestClient, fleet: tuple[Fleet, list[list[int]]], monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    from ota_server import cli, cli_common
    from ota_server.client import ApiClient, ClientSettings

    def in_process(server: str | None, token: str | None) -> ApiClient:
        # the real app over the in-process transport
        return ApiClient(ClientSettings(url="http://testserver", token=token), http=client)

    monkeypatch.setattr(cli_common, "client", in_process)
    app = typer.Typer()
    cli.register(app)
    runner = CliRunner()
    token = AUTH["Authorization"].split()[1]
    table = runner.invoke(app, ["telemetry", "summary", "--model", "digits", "--token", token])
    assert table.exit_code == 0, table.output
    assert "digits" in table.stdout and "drift" in table.stdout and "attribution 100.0%" in table.stdout
    out = runner.invoke(app, ["telemetry", "summary", "--json", "--profile", "x86", "--token", token])
    assert out.exit_code == 0 and json.loads(out.stdout)["groups"][0]["requests"] == sum(w["n"] for w in fleet[0].sent)
    refused = runner.invoke(app, ["telemetry", "summary", "--version", "bad", "--token", token])
    assert refused.exit_code != 0 and "422" in str(refused.exception)


def test_unknown_bundles_lower_attribution_and_few_values_are_insufficient(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """A window whose bundle sha names no stored bundle is counted but not attributed; a feature with fewer
    values than the drift rule's minimum has a PSI but no verdict (``insufficient``), never ``drift``."""
    rng = np.random.default_rng(3)
    reference, _ = _reference(rng)
    sha = upload(client, make_bundle("1.0.0", "x86", reference=reference)).json()["bundle_sha256"]
    body = {"device_id": "cam-5", "hardware_profile": "x86", "labels": {"cohort": "east"}}
    assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    f = Fleet(ctx, sha, rng)
    f.send("cam-5", T0, n=60)  # 60 values per feature: under the minimum of 200
    f.sha = "e" * 64  # a bundle this server never stored
    f.send("cam-5", T0, n=40)
    summary = _summary(client, cohort="cohort=east")
    assert summary["source"] == "aggregates"  # the configured cohort label is an aggregate dimension
    assert summary["attribution"] == {"requests": 100, "attributed_requests": 60, "coverage": 0.6}
    (group,) = summary["groups"]  # same model, version and (the device's) profile: one group
    assert group["bundle_sha256"] == sorted([sha, "e" * 64]) and group["attribution"]["coverage"] == 0.6
    assert group["drift"]["label"] == "insufficient"
    shifted = next(d for d in group["drift"]["features"] if d["feature"] == SHIFTED)
    assert shifted["level"] == "insufficient" and shifted["psi"] > 0.25 and shifted["note"] == "100 of 200 values"
    assert _summary(client, cohort="cohort=west")["groups"] == []


def test_a_later_window_shows_in_the_next_summary(client: TestClient, fleet: tuple[Fleet, list[list[int]]]) -> None:
    """Decoded aggregate rows are cached between reviews: a row a new window changed is read again."""
    f, _ = fleet
    before = _summary(client)["groups"][0]
    f.send("cam-1", T0 + timedelta(minutes=2), n=70)  # the same time bucket as earlier windows: an updated row
    after = _summary(client)["groups"][0]
    assert after["requests"] == before["requests"] + 70 and after["windows"] == before["windows"] + 1
    assert after == _summary(client, since=T0.isoformat(), until="2030-01-01T00:00:00Z")["groups"][0]
