"""Alerts over the real ingest path and database (SQLite and PostgreSQL): a round fires a drift alert naming the
feature, de-duplicates, resolves, honours the cooldown; deliveries go to a real HTTP receiver (HMAC verified,
retried after a 503) and to a real command that gets the export's location; the API, the CLI, the audit log and
``/metrics`` show it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.telemetry import LATENCY_EDGES_MS, FeatureReference, FeatureSummary, ReferenceStats
from edgeota_contract.topics import Channel, device_topic
from ota_server.alerts.config import AlertRules, parse_rules
from ota_server.alerts.delivery import run_exports, send_pending
from ota_server.alerts.loop import delivery_env
from ota_server.alerts.service import RoundResult, evaluate_round
from ota_server.context import ServerContext

from .alert_receivers import Receiver, recorded, recorder_command, webhook_receiver
from .conftest import AUTH, BundleFactory, make_token, upload
from .helpers import deliver
from .test_telemetry_metrics import scrape

EDGES = [-1.5, -0.5, 0.0, 0.5, 1.5]
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
SECRET = "w" * 32


def _hist(values: np.ndarray) -> list[int]:
    idx = np.searchsorted(np.asarray(EDGES), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(EDGES) + 1)]


class Fleet:
    def __init__(self, client: TestClient, ctx: ServerContext, make_bundle: BundleFactory) -> None:
        self.ctx, self.rng, self.seq = ctx, np.random.default_rng(11), 0
        ref = ReferenceStats(
            sample_count=20_000,
            features=[
                FeatureReference(input="x", feature=j, edges=EDGES, counts=_hist(self.rng.normal(size=20_000)))
                for j in range(4)
            ],
        )
        resp = upload(client, make_bundle("1.0.0", "x86", reference=ref.model_dump_json().encode()))
        assert resp.status_code == 201, resp.text
        self.sha = resp.json()["bundle_sha256"]
        body = {"device_id": "cam-1", "hardware_profile": "x86", "labels": {"cohort": "north"}}
        assert client.post("/api/v1/devices", json=body, headers=AUTH).status_code == 201

    def send(self, end: datetime, shift: float, n: int = 600) -> None:
        self.seq += 1
        x = self.rng.normal(size=(n, 4))
        x[:, 1] += shift
        window = TelemetryWindow(
            boot_id="boot-a",
            seq=self.seq,
            model_name="digits",
            version="1.0.0",
            bundle_sha256=self.sha,
            window_start=end - timedelta(minutes=1),
            window_end=end,
            request_count=n,
            error_count=0,
            latency_counts=[n] + [0] * len(LATENCY_EDGES_MS),
            features=[FeatureSummary(input="x", feature=j, edges=EDGES, counts=_hist(x[:, j])) for j in range(4)],
        )
        topic = device_topic("cam-1", Channel.TELEMETRY)
        assert deliver(self.ctx, topic, window.model_dump_json().encode()) == "ok"


def _rules(receiver: Receiver, argv: list[str], tmp_path: Path) -> AlertRules:
    data = {
        "webhooks": {"oncall": {"url": receiver.url, "secret_env": "HOOK_SECRET", "backoff_seconds": 0}},
        "commands": {"retrain": {"argv": argv, "env": {"MARK": "from-rules"}}},
        "rules": [
            {
                "name": "digits-drift",
                "kind": "drift",
                "model": "digits",
                "window": "1h",
                "cooldown": "1h",
                "severity": "critical",
                "export": True,
                "deliver": ["oncall", "retrain"],
            }
        ],
    }
    return parse_rules(data, tmp_path, {"HOOK_SECRET": SECRET})


def _round(ctx: ServerContext, rules: AlertRules, now: datetime) -> RoundResult:
    """What the loop runs, at a chosen time: evaluate + commit, then exports and deliveries."""
    with ctx.sessions() as session, session.begin():
        result = evaluate_round(session, ctx.store, rules, now, ctx.settings.telemetry_bucket_seconds)
    env = delivery_env(ctx)
    env.sleep = lambda _s: None
    run_exports(env, rules)
    send_pending(env, rules)
    return result


def _alerts(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    resp = client.get("/api/v1/alerts", params=params, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_drift_alert_lifecycle_and_delivery(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    fleet = Fleet(client, ctx, make_bundle)
    argv, out = recorder_command(tmp_path)
    with webhook_receiver(SECRET.encode(), statuses=[503]) as hook:
        rules = _rules(hook, argv, tmp_path)
        fleet.send(T0, shift=1.0)
        fleet.send(T0 + timedelta(minutes=1), shift=1.0)
        first = _round(ctx, rules, T0 + timedelta(minutes=5))
        assert len(first.fired) == 1
        (alert,) = _alerts(client, state="firing")
        assert alert["features"] == ["x[1]"] and "x[1]" in alert["summary"] and alert["severity"] == "critical"
        assert alert["scope"] == {
            "model_name": "digits",
            "version": "1.0.0",
            "hardware_profile": "x86",
            "cohort": "north",
        }
        assert alert["export"]["state"] == "done" and Path(alert["export"]["path"]).is_dir()

        # the webhook: first attempt answered 503, the retry accepted with a valid HMAC over the exact body
        assert [r.problem for r in hook.received] == [None, None]
        (got,) = [r for r in hook.accepted() if r.json["event"] == "fired"][-1:]
        assert got.json["alert"]["id"] == alert["id"] and got.json["alert"]["features"] == ["x[1]"]
        assert got.headers["X-Edgeota-Delivery"] == hook.received[0].headers["X-Edgeota-Delivery"]
        hook_delivery = next(d for d in alert["deliveries"] if d["target"] == "oncall")
        assert hook_delivery["state"] == "delivered"
        assert [a["status"] for a in hook_delivery["attempts"]] == [503, 200]

        # the command: the alert on stdin, the export's location in its environment, nothing of the server's env
        (ran,) = recorded(out)
        assert ran["stdin"]["alert"]["id"] == alert["id"] and ran["env"]["MARK"] == "from-rules"
        assert ran["env"]["EDGEOTA_ALERT_EXPORT_DIR"] == alert["export"]["path"]
        assert ran["manifest"]["trigger"] == f"alert:{alert['id']}"
        assert ran["manifest"]["drift_report"]["families"][0]["features"][0]["key"] == "x[1]"
        assert "EDGEOTA_SERVER_DATABASE_URL" not in ran["env"] and ran["env"]["EDGEOTA_ALERT_FEATURES"] == "x[1]"

        # de-duplication: the same condition again updates the open alert, sends nothing new
        fleet.send(T0 + timedelta(minutes=6), shift=1.0)
        again = _round(ctx, rules, T0 + timedelta(minutes=10))
        assert again.fired == [] and again.refreshed == [alert["id"]]
        (same,) = _alerts(client)
        assert same["evaluations"] == 2 and len(hook.received) == 2 and len(recorded(out)) == 1

        # acknowledgement: operator role, audited, once
        viewer, operator = make_token(client, "viewer"), make_token(client, "operator")
        ack = f"/api/v1/alerts/{alert['id']}/ack"
        assert client.post(ack, json={"reason": "looking"}, headers=viewer).status_code == 403
        resp = client.post(ack, json={"reason": "looking"}, headers=operator)
        assert resp.status_code == 200 and resp.json()["state"] == "acknowledged", resp.text
        conflict = client.post(ack, json={}, headers=operator)
        assert conflict.status_code == 409 and "already acknowledged" in conflict.json()["detail"]
        (entry,) = client.get("/api/v1/audit", params={"action": "alert.ack"}, headers=AUTH).json()
        assert entry["entity_id"] == alert["id"] and entry["reason"] == "looking" and entry["actor"] == "token:operator"

        # resolve: an hour later only reference-like data is in the window
        fleet.send(T0 + timedelta(hours=2), shift=0.0, n=2000)
        done = _round(ctx, rules, T0 + timedelta(hours=2, minutes=5))
        assert done.resolved == [alert["id"]]
        (closed,) = _alerts(client, state="resolved")
        assert closed["resolve_reason"] == "condition cleared" and closed["acked_by"] == "token:operator"
        assert closed["features"] == ["x[1]"] and "stable" in closed["details"]["cleared"]["summary"]
        assert [r.json["event"] for r in hook.accepted()] == ["fired", "resolved"]
        late = client.post(ack, json={}, headers=operator)
        assert late.status_code == 409 and "already resolved" in late.json()["detail"]

        # cooldown: drift again within an hour of the resolve is suppressed; after it, a new alert fires
        fleet.send(T0 + timedelta(hours=2, minutes=30), shift=1.0, n=4000)
        quiet = _round(ctx, rules, T0 + timedelta(hours=2, minutes=35))
        assert quiet.suppressed == 1 and quiet.fired == [] and _alerts(client, state="open") == []
        fleet.send(T0 + timedelta(hours=3, minutes=10), shift=1.0, n=4000)
        later = _round(ctx, rules, T0 + timedelta(hours=3, minutes=15))
        assert len(later.fired) == 1 and later.fired[0] != alert["id"]

    metrics = scrape(client)
    assert metrics["edgeota_alerts_total"][()] == 2
    assert (
        metrics["edgeota_alerts_raised_total"][(("kind", "drift"), ("rule", "digits-drift"), ("severity", "critical"))]
        == 2
    )
    open_key = (("kind", "drift"), ("rule", "digits-drift"), ("severity", "critical"), ("state", "firing"))
    assert metrics["edgeota_alerts_open"][open_key] == 1
    assert metrics["edgeota_alert_deliveries_total"][(("state", "delivered"), ("target_kind", "webhook"))] == 3


def test_api_rejections_and_cli(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert client.get("/api/v1/alerts").status_code == 401
    assert client.get("/api/v1/alerts", params={"state": "burning"}, headers=AUTH).status_code == 422
    assert client.get("/api/v1/alerts/not-an-id", headers=AUTH).status_code == 422
    missing = client.post(f"/api/v1/alerts/{'0' * 32}/ack", json={}, headers=AUTH)
    assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    assert client.post(f"/api/v1/alerts/{'0' * 32}/ack", json={"who": 1}, headers=AUTH).status_code == 422

    fleet = Fleet(client, ctx, make_bundle)
    fleet.send(T0, shift=1.0, n=2000)
    rules = parse_rules({"rules": [{"name": "d", "kind": "drift", "model": "digits", "window": "1h"}]}, tmp_path, {})
    assert len(_round(ctx, rules, T0 + timedelta(minutes=5)).fired) == 1

    from ota_server import cli_common
    from ota_server.cli import register
    from ota_server.client import ApiClient, ClientSettings

    def in_process(server: str | None, token: str | None) -> ApiClient:
        return ApiClient(ClientSettings(url="http://testserver", token=token), http=client)

    import typer

    monkeypatch.setattr(cli_common, "client", in_process)
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    listed = runner.invoke(app, ["alerts", "list", "--output", "json", "--token", "admin-token-for-tests-0123456789"])
    assert listed.exit_code == 0, listed.output
    (record,) = json.loads(listed.output)
    assert record["features"] == ["x[1]"] and record["state"] == "firing"
    table = runner.invoke(
        app,
        ["alerts", "list", "--state", "open", "--token", "admin-token-for-tests-0123456789"],
        env={"COLUMNS": "250"},
    )
    assert table.exit_code == 0 and record["id"] in table.output and "x[1]" in table.output
    bad = runner.invoke(app, ["alerts", "list", "--output", "yaml"])
    assert bad.exit_code == 2 and "yaml" in bad.output
    state = runner.invoke(app, ["alerts", "list", "--state", "burning"])
    assert state.exit_code != 0 and "--state must be one of open, firing" in str(state.exception)
    good = tmp_path / "ok.toml"
    good.write_text('[[rules]]\nname = "d"\nkind = "drift"\nmodel = "digits"\n')
    checked = runner.invoke(app, ["alerts", "check", str(good)])
    assert checked.exit_code == 0 and "1 rules, 0 delivery targets: ok" in checked.output
    good.write_text('[[rules]]\nname = "d"\nkind = "drift"\n')
    refused = runner.invoke(app, ["alerts", "check", str(good)])
    assert refused.exit_code != 0 and "rules.0.model: Field required" in str(refused.exception)
    acked = runner.invoke(app, ["alerts", "ack", record["id"], "--token", "admin-token-for-tests-0123456789"])
    assert acked.exit_code == 0 and f"acknowledged {record['id']}" in acked.output


def test_accuracy_rule_reads_field_accuracy(client: TestClient, ctx: ServerContext, tmp_path: Path) -> None:
    """The accuracy kind against ``services.accuracy.field_accuracy`` over stored feedback (60% right in north)."""
    from ota_server.models import Feedback

    with ctx.sessions() as session, session.begin():
        for i in range(150):
            session.add(
                Feedback(
                    device_id="cam-1" if i % 2 else "cam-2",
                    prediction_id=f"p{i}",
                    model_name="digits",
                    version="1.0.0",
                    bundle_sha256="b" * 64,
                    hardware_profile="x86",
                    cohort="north",
                    predicted="1",
                    label="1" if i % 5 < 3 else "2",
                    correct=i % 5 < 3,
                    source="api",
                    received_at=T0 - timedelta(minutes=5),
                )
            )
    rules = parse_rules(
        {"rules": [{"name": "acc", "kind": "accuracy", "model": "digits", "threshold": 0.8, "window": "1d"}]},
        tmp_path,
        {},
    )
    result = _round(ctx, rules, T0)
    assert len(result.fired) == 1
    (alert,) = _alerts(client)
    assert alert["kind"] == "accuracy" and alert["value"] == pytest.approx(0.6) and alert["scope"]["cohort"] == "north"
    assert "accuracy 60.0% under 80.0%" in alert["summary"] and alert["details"] == {"n": 150}
    strict = parse_rules(
        {"rules": [{"name": "acc", "kind": "accuracy", "model": "digits", "min_count": 500, "window": "1d"}]},
        tmp_path,
        {},
    )
    assert _round(ctx, strict, T0 + timedelta(minutes=1)).resolved == []  # too few labels now: stays open


def test_a_webhook_down_for_a_while_gets_the_alert_later(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory, tmp_path: Path
) -> None:
    """A transient failure keeps the delivery pending until its next attempt time; a later round delivers it."""
    from sqlalchemy import update

    from ota_server.alerts.records import AlertDelivery

    fleet = Fleet(client, ctx, make_bundle)
    fleet.send(T0, shift=1.0, n=2000)
    with webhook_receiver(SECRET.encode(), statuses=[503] * 3) as hook:
        data = {
            "webhooks": {"oncall": {"url": hook.url, "secret_env": "S", "backoff_seconds": 0, "max_attempts": 2}},
            "rules": [{"name": "d", "kind": "drift", "model": "digits", "window": "1h", "deliver": ["oncall"]}],
        }
        rules = parse_rules(data, tmp_path, {"S": SECRET})
        assert len(_round(ctx, rules, T0 + timedelta(minutes=5)).fired) == 1
        (pending,) = _alerts(client)[0]["deliveries"]
        assert pending["state"] == "pending" and [a["status"] for a in pending["attempts"]] == [503, 503]
        _round(ctx, rules, T0 + timedelta(minutes=6))  # not due yet: nothing is sent
        assert len(hook.received) == 2
        with ctx.sessions() as session, session.begin():  # as if the wait had passed
            session.execute(update(AlertDelivery).values(next_attempt_at=T0))
        _round(ctx, rules, T0 + timedelta(minutes=7))
        (done,) = _alerts(client)[0]["deliveries"]
        assert done["state"] == "delivered" and [a["status"] for a in done["attempts"]] == [503, 503, 503, 200]
        assert len(hook.accepted()) == 1 and len({r.headers["X-Edgeota-Delivery"] for r in hook.received}) == 1
