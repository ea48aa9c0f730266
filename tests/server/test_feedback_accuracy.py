"""Feedback (MQTT ingest and REST) and field accuracy with its label-free estimate, on both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from edgeota_contract.bundle import create_bundle
from edgeota_contract.calibration import CALIBRATION_FILE, ConfidenceCalibration, OutputCalibration
from edgeota_contract.messages import FeedbackItem, FeedbackReport, TelemetryWindow
from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS, OutputSummary
from edgeota_contract.topics import Channel, device_topic
from ota_server.context import ServerContext
from ota_server.models import Feedback
from ota_server.services.accuracy import field_accuracy

from .conftest import AUTH, Keys, bundle_fields, make_token, upload
from .helpers import deliver

T0 = datetime(2026, 3, 1, tzinfo=UTC)
BINS = len(CONFIDENCE_EDGES) + 1


def _calibration() -> ConfidenceCalibration:
    counts, correct = [0] * BINS, [0] * BINS
    counts[-1], correct[-1] = 1000, 990  # confidence >= 0.99
    counts[5], correct[5] = 100, 40  # [0.5, 0.6)
    return ConfidenceCalibration(
        outputs=[OutputCalibration(output="y", edges=list(CONFIDENCE_EDGES), counts=counts, correct=correct)]
    )


def _bundle(tmp_path: Path, keys: Keys, version: str, calibrated: bool) -> Path:
    path = tmp_path / f"digits-{version}.bundle.tar"
    payload = {
        "model.onnx": f"model {version}".encode() * 50,
        "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
        "test_vectors.npz": b"vectors",
        "model_card.md": b"# card\n",
    }
    if calibrated:
        payload[CALIBRATION_FILE] = _calibration().model_dump_json().encode()
    create_bundle(path, payload, keys.release, **bundle_fields(version, "x86"))
    return path


@pytest.fixture
def shas(client: TestClient, tmp_path: Path, keys: Keys) -> dict[str, str]:
    out = {}
    for version, calibrated in (("1.0.0", True), ("1.1.0", False)):
        resp = upload(client, _bundle(tmp_path, keys, version, calibrated))
        assert resp.status_code == 201, resp.text
        out[version] = resp.json()["bundle_sha256"]
    for device, cohort in (("cam-1", "north"), ("cam-2", "south"), ("cam-3", None)):
        labels = {"cohort": cohort} if cohort else {}
        body = {"device_id": device, "hardware_profile": "x86", "labels": labels}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201
    return out


def _item(sha: str, pid: str, predicted: str | None, label: str | None, **kw: Any) -> dict[str, Any]:
    version = kw.pop("version", "1.0.0")
    return dict(
        prediction_id=pid,
        model_name="digits",
        version=version,
        bundle_sha256=sha,
        predicted=predicted,
        label=label,
        **kw,
    )


def _report(ctx: ServerContext, device: str, items: list[dict[str, Any]], seq: int = 1) -> str:
    msg = FeedbackReport(boot_id="boot", seq=seq, items=[FeedbackItem(**i) for i in items])
    return deliver(ctx, device_topic(device, Channel.FEEDBACK), msg.model_dump_json().encode())


def _window(ctx: ServerContext, device: str, sha: str, version: str, conf: list[int], seq: int) -> None:
    n = sum(conf)
    window = TelemetryWindow(
        boot_id=f"boot-{device}",
        seq=seq,
        model_name="digits",
        version=version,
        bundle_sha256=sha,
        window_start=T0,
        window_end=T0 + timedelta(minutes=1),
        request_count=n,
        error_count=0,
        latency_counts=[n] + [0] * len(LATENCY_EDGES_MS),
        outputs=[OutputSummary(output="y", class_counts=[n, 0], confidence_counts=conf)],
    )
    assert deliver(ctx, device_topic(device, Channel.TELEMETRY), window.model_dump_json().encode()) == "ok"


def _rows(client: TestClient, headers: dict[str, str] | None = None, **params: Any) -> list[dict[str, Any]]:
    resp = client.get("/api/v1/accuracy", params={"model_name": "digits", **params}, headers=headers or AUTH)
    assert resp.status_code == 200, resp.text
    rows: list[dict[str, Any]] = resp.json()["rows"]
    return rows


def test_feedback_over_mqtt_gives_accuracy_per_cohort(
    client: TestClient, ctx: ServerContext, shas: dict[str, str]
) -> None:
    sha = shas["1.0.0"]
    # cam-1 (north): 3 of 4 right; cam-2 (south): 1 of 2 right; one reward-only item counts for no accuracy
    north = [_item(sha, f"n{i}", "3", "3" if i < 3 else "5") for i in range(4)]
    assert _report(ctx, "cam-1", north) == "ok"
    south = [_item(sha, "s0", "1", "1"), _item(sha, "s1", "1", "7"), _item(sha, "s2", "2", None, reward=0.5)]
    assert _report(ctx, "cam-2", south) == "ok"
    assert _report(ctx, "cam-1", north, seq=2) == "ok"  # re-delivered: stored once
    rows = {r["cohort"]: r for r in _rows(client, make_token(client, "viewer"))}
    assert set(rows) == {"north", "south"}
    assert (rows["north"]["labelled"], rows["north"]["correct"], rows["north"]["accuracy"]) == (4, 3, 0.75)
    assert (rows["south"]["labelled"], rows["south"]["correct"], rows["south"]["accuracy"]) == (2, 1, 0.5)
    assert rows["north"]["hardware_profile"] == "x86" and rows["north"]["version"] == "1.0.0"
    with ctx.sessions() as s:
        assert len(list(s.scalars(select(Feedback)))) == 7
        only_north = field_accuracy(s, model_name="digits", cohort="north")
    assert [(r.cohort, r.labelled, r.correct) for r in only_north] == [("north", 4, 3)]


def test_metrics_show_field_accuracy_by_cohort_never_by_device(
    client: TestClient, ctx: ServerContext, shas: dict[str, str]
) -> None:
    from .test_telemetry_metrics import scrape

    sha = shas["1.0.0"]
    assert _report(ctx, "cam-1", [_item(sha, f"n{i}", "3", "3" if i < 3 else "5") for i in range(4)]) == "ok"
    metrics = scrape(client)
    key = (("cohort", "north"), ("model", "digits"), ("profile", "x86"), ("version", "1.0.0"))
    assert metrics["edgeota_feedback_labelled"][key] == 4
    assert metrics["edgeota_feedback_correct"][key] == 3
    assert metrics["edgeota_field_accuracy"][key] == 0.75
    assert all("device" not in dict(k) for k in metrics["edgeota_field_accuracy"])


def test_later_feedback_replaces_label_and_keeps_the_rest(
    client: TestClient, ctx: ServerContext, shas: dict[str, str]
) -> None:
    sha = shas["1.0.0"]
    assert _report(ctx, "cam-1", [_item(sha, "p", "3", "5")]) == "ok"
    operator = make_token(client, "operator")
    body = {"device_id": "cam-1", "items": [_item(sha, "p", "3", None, reward=1.0)]}
    assert client.post("/api/v1/feedback", json=body, headers=operator).status_code == 201
    with ctx.sessions() as s:
        (row,) = s.scalars(select(Feedback))
        assert (row.label, row.correct, row.reward, row.source) == ("5", False, 1.0, "api")
    body = {"device_id": "cam-1", "items": [_item(sha, "p", "3", "3")]}
    assert client.post("/api/v1/feedback", json=body, headers=operator).json() == {"device_id": "cam-1", "stored": 1}
    assert [(r["labelled"], r["correct"]) for r in _rows(client)] == [(1, 1)]


def test_rows_of_a_batched_request_are_separate(client: TestClient, ctx: ServerContext, shas: dict[str, str]) -> None:
    sha = shas["1.0.0"]
    items = [_item(sha, "batch", "1", "1", row=0), _item(sha, "batch", "2", "1", row=1)]
    assert _report(ctx, "cam-3", items) == "ok"
    (row,) = _rows(client)
    assert (row["cohort"], row["labelled"], row["correct"]) == ("", 2, 1)


def test_estimate_from_confidence_and_calibration(client: TestClient, ctx: ServerContext, shas: dict[str, str]) -> None:
    conf = [0] * BINS
    conf[-1], conf[5] = 300, 100
    _window(ctx, "cam-1", shas["1.0.0"], "1.0.0", conf, seq=1)
    _window(ctx, "cam-1", shas["1.1.0"], "1.1.0", conf, seq=2)  # no calibration in its bundle
    assert _report(ctx, "cam-1", [_item(shas["1.0.0"], "a", "0", "0")]) == "ok"
    rows = {r["version"]: r for r in _rows(client)}
    # histogram binning with one pseudo-row at the bin's mid confidence
    p_top = (990 + (0.99 + 1.0) / 2) / 1001
    p_mid = (40 + (0.5 + 0.6) / 2) / 101
    assert rows["1.0.0"]["estimated_accuracy"] == pytest.approx((300 * p_top + 100 * p_mid) / 400)
    assert rows["1.0.0"]["estimate_requests"] == 400
    assert (rows["1.0.0"]["labelled"], rows["1.0.0"]["accuracy"]) == (1, 1.0)
    assert rows["1.1.0"]["estimated_accuracy"] is None and rows["1.1.0"]["estimate_requests"] == 0
    assert rows["1.1.0"]["labelled"] == 0 and rows["1.1.0"]["accuracy"] is None
    assert [r["version"] for r in _rows(client, version="1.1.0")] == ["1.1.0"]
    # since: telemetry by bucket (T0 is before it), feedback by arrival (now is after it)
    (after,) = _rows(client, since=(T0 + timedelta(days=1)).isoformat())
    assert (after["version"], after["labelled"], after["estimated_accuracy"]) == ("1.0.0", 1, None)
    assert _rows(client, since=(datetime.now(UTC) + timedelta(days=1)).isoformat()) == []


def test_cli_accuracy_table_and_json(
    client: TestClient, ctx: ServerContext, shas: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from ota_server import cli, cli_common
    from ota_server.client import ApiClient, ClientSettings

    def in_process(server: str | None, token: str | None) -> ApiClient:
        return ApiClient(ClientSettings(url="http://testserver", token=token), http=client)

    monkeypatch.setattr(cli_common, "client", in_process)
    app = typer.Typer()
    cli.register(app)
    runner = CliRunner()
    token = AUTH["Authorization"].split()[1]
    assert _report(ctx, "cam-1", [_item(shas["1.0.0"], "a", "0", "0"), _item(shas["1.0.0"], "b", "0", "1")]) == "ok"
    out = runner.invoke(app, ["telemetry", "accuracy", "--model", "digits", "--output", "json", "--token", token])
    assert out.exit_code == 0, out.output
    (row,) = json.loads(out.stdout)["rows"]
    assert (row["cohort"], row["labelled"], row["correct"], row["accuracy"]) == ("north", 2, 1, 0.5)
    table = runner.invoke(app, ["telemetry", "accuracy", "--model", "digits", "--token", token])
    assert table.exit_code == 0 and "north" in table.stdout and "50.0%" in table.stdout
    refused = runner.invoke(app, ["telemetry", "accuracy", "--model", "digits", "--version", "bad", "--token", token])
    assert refused.exit_code != 0 and "422" in str(refused.exception)
    bad_output = runner.invoke(app, ["telemetry", "accuracy", "--model", "digits", "--output", "xml", "--token", token])
    assert bad_output.exit_code == 2
    assert runner.invoke(app, ["telemetry", "accuracy", "--token", token]).exit_code == 2  # no --model


# ------------------------------------------------------------------ rejections


def _post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post("/api/v1/feedback", json=body, headers=AUTH if headers is None else headers)


def test_feedback_rejections(client: TestClient, ctx: ServerContext, shas: dict[str, str]) -> None:
    sha = shas["1.0.0"]
    good = {"device_id": "cam-1", "items": [_item(sha, "p1", "3", "3")]}
    assert _post(client, good, {}).status_code == 401
    assert _post(client, good, make_token(client, "viewer")).status_code == 403
    assert _post(client, {**good, "device_id": "nope"}).status_code == 404
    assert _post(client, {**good, "items": []}).status_code == 422
    assert _post(client, {**good, "extra": 1}).status_code == 422
    assert _post(client, {**good, "device_id": "bad/id"}).status_code == 422
    no_label = {"device_id": "cam-1", "items": [_item(sha, "p1", "3", None)]}
    assert _post(client, no_label).status_code == 422
    unpredicted = {"device_id": "cam-1", "items": [_item(sha, "p1", None, "3")]}
    resp = _post(client, unpredicted)
    assert resp.status_code == 422 and "predicted class" in resp.json()["detail"]
    unknown = {"device_id": "cam-1", "items": [_item("e" * 64, "p1", "3", "3")]}
    assert "not stored" in _post(client, unknown).json()["detail"]
    wrong = {"device_id": "cam-1", "items": [_item(sha, "p1", "3", "3", version="1.1.0")]}
    resp = _post(client, wrong)
    assert resp.status_code == 422 and "not digits 1.1.0" in resp.json()["detail"]
    bad_reward = {"device_id": "cam-1", "items": [_item(sha, "p1", "3", None, reward=1.5)]}
    assert _post(client, bad_reward).status_code == 422
    # all or nothing: one bad item stores none of the batch
    mixed = {"device_id": "cam-1", "items": [_item(sha, "ok", "3", "3"), _item("e" * 64, "p2", "3", "3")]}
    assert _post(client, mixed).status_code == 422
    with ctx.sessions() as s:
        assert list(s.scalars(select(Feedback))) == []
    assert _post(client, good).status_code == 201


def test_device_token_reports_for_itself_only(client: TestClient, shas: dict[str, str]) -> None:
    resp = client.post("/api/v1/devices", json={"device_id": "cam-9", "hardware_profile": "x86"}, headers=AUTH)
    token = resp.json()["token"]
    body = {"device_id": "cam-1", "items": [_item(shas["1.0.0"], "p1", "3", "3")]}
    own = {"Authorization": f"Bearer {token}"}
    assert _post(client, body, own).status_code == 403
    assert _post(client, {**body, "device_id": "cam-9"}, own).status_code == 201


def test_accuracy_rejections(client: TestClient, shas: dict[str, str]) -> None:
    assert client.get("/api/v1/accuracy", params={"model_name": "digits"}).status_code == 401
    assert client.get("/api/v1/accuracy", headers=AUTH).status_code == 422
    assert client.get("/api/v1/accuracy", params={"model_name": "bad name"}, headers=AUTH).status_code == 422
    params = {"model_name": "digits", "version": "x"}
    assert client.get("/api/v1/accuracy", params=params, headers=AUTH).status_code == 422
    params = {"model_name": "digits", "since": "yesterday"}
    assert client.get("/api/v1/accuracy", params=params, headers=AUTH).status_code == 422


def test_malformed_feedback_message_is_not_stored(ctx: ServerContext, shas: dict[str, str]) -> None:
    topic = device_topic("cam-1", Channel.FEEDBACK)
    assert deliver(ctx, topic, b'{"kind":"feedback","boot_id":"b","seq":1,"items":[]}') == "malformed"
    window_on_feedback = TelemetryWindow(
        boot_id="b",
        seq=1,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=shas["1.0.0"],
        window_start=T0,
        window_end=T0,
        request_count=0,
        error_count=0,
        latency_counts=[0] * (len(LATENCY_EDGES_MS) + 1),
    )
    assert deliver(ctx, topic, window_on_feedback.model_dump_json().encode()) == "malformed"
    msg = FeedbackReport(boot_id="b", seq=2, items=[FeedbackItem(**_item(shas["1.0.0"], "p", "1", "1"))])
    assert deliver(ctx, device_topic("ghost", Channel.FEEDBACK), msg.model_dump_json().encode()) == "unknown_device"
    with ctx.sessions() as s:
        assert list(s.scalars(select(Feedback))) == []
