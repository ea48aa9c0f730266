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
from ota_server.mqtt_bridge import process_message

from .conftest import AUTH, BundleFactory, make_token, upload

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
        assert process_message(self.ctx, topic, window.model_dump_json().encode()) == "ok"
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
        assert psis[j]["label"] == ("act" if j == SHIFTED else "stable")
        assert psis[j]["values"] == int(np.isfinite(x[:, j]).sum())
        if j != SHIFTED:
            assert psis[j]["psi"] < 0.02  # reference-like data
    assert g["drift"]["features"][0]["feature"] == SHIFTED and g["drift"]["label"] == "act"
    assert g["drift"]["max_psi"] == psis[SHIFTED]["psi"]
    classes = np.concatenate([w["classes"] for w in f.sent])
    assert g["outputs"]["y"]["class_counts"] == np.bincount(classes, minlength=3).tolist()
    shadowed = [w for w in f.sent if w["shadow"]]
    (shadow,) = g["shadow"]
    assert shadow["compared"] == sum(w["n"] for w in shadowed)
    assert shadow["agreement"] == pytest.approx(sum(w["n"] - w["errors"] for w in shadowed) / shadow["compared"])
    assert g["spool_dropped"] == 4 + 2  # per device the latest cumulative figure, summed


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

    from ota_server import cli
    from ota_server.client import ApiClient, ClientSettings

    def in_process(server: str | None, token: str | None) -> ApiClient:
        api = ApiClient(ClientSettings(url="http://testserver", token=token))
        api._http = client  # the real app over the in-process transport
        client.headers.update({"Authorization": f"Bearer {token}"} if token else {})
        return api

    monkeypatch.setattr(cli, "_client", in_process)
    app = typer.Typer()
    cli.register(app)
    runner = CliRunner()
    token = AUTH["Authorization"].split()[1]
    table = runner.invoke(app, ["telemetry", "summary", "--model", "digits", "--token", token])
    assert table.exit_code == 0, table.output
    assert "digits" in table.stdout and "act" in table.stdout
    out = runner.invoke(app, ["telemetry", "summary", "--json", "--profile", "x86", "--token", token])
    assert out.exit_code == 0 and json.loads(out.stdout)["groups"][0]["requests"] == sum(w["n"] for w in fleet[0].sent)
    refused = runner.invoke(app, ["telemetry", "summary", "--version", "bad", "--token", token])
    assert refused.exit_code != 0 and "422" in str(refused.exception)


def test_drift_labels_follow_the_usual_psi_reading() -> None:
    from ota_server.rollout.telemetry_gates import drift_label

    assert [drift_label(v) for v in (0.0, 0.0999, 0.1, 0.25, 0.2501, 3.0)] == [
        "stable",
        "stable",
        "watch",
        "watch",
        "act",
        "act",
    ]
