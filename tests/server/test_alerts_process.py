"""Alerts end to end: `edgeota server run --workers 2` with an alert rules file, real Mosquitto, devices that send
telemetry windows through the broker as an agent does, a real HTTP webhook receiver that verifies the HMAC, and a
command that gets the export's location (SQLite and PostgreSQL).

Cohort ``north`` sees feature 1 of input ``x`` shifted by one standard deviation; cohort ``south`` sees reference-like
data. The core process evaluates the rules every half second: the receiver must get one signed ``fired`` delivery
naming ``x[1]`` for north and nothing for south, the command must find the export's manifest, and ``/metrics``
(answered by an API worker) must count the alert.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeota_contract.messages import TelemetryWindow
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.telemetry import LATENCY_EDGES_MS, FeatureReference, FeatureSummary, ReferenceStats
from edgeota_contract.topics import Channel, device_topic
from tests.conftest import Broker

from .alert_receivers import recorded, recorder_command, webhook_receiver
from .conftest import ADMIN, BundleFactory, Keys
from .procs import EDGEOTA, ServerProcess
from .simdevice import SimDevice
from .test_server_process import publish, wait_for

pytestmark = pytest.mark.integration
EDGES = [-1.5, -0.5, 0.0, 0.5, 1.5]
SECRET = "integration-hook-secret-0123456789"


def _hist(values: np.ndarray) -> list[int]:
    idx = np.searchsorted(np.asarray(EDGES), values, side="right")
    return [int(c) for c in np.bincount(idx, minlength=len(EDGES) + 1)]


def _rules_file(tmp_path: Path, url: str, argv: list[str]) -> Path:
    path = tmp_path / "alerts.toml"
    path.write_text(
        f"""
[webhooks.oncall]
url = "{url}"
secret_env = "EDGEOTA_TEST_HOOK_SECRET"
backoff_seconds = 0.2

[commands.retrain]
argv = {json.dumps(argv)}
timeout_seconds = 60

[[rules]]
name = "digits-drift"
kind = "drift"
model = "digits"
window = "1h"
cooldown = "1h"
severity = "critical"
export = true
deliver = ["oncall", "retrain"]

[[rules]]
name = "digits-errors"
kind = "error_rate"
model = "digits"
threshold = 0.2
min_count = 100
deliver = ["oncall"]
"""
    )
    return path


@pytest.fixture
def hook() -> Iterator[object]:
    with webhook_receiver(SECRET.encode()) as receiver:
        yield receiver


def _device(server: ServerProcess, cohort: str, tag: str) -> SimDevice:
    body = {"device_id": f"{tag}-{cohort}", "hardware_profile": "x86", "labels": {"cohort": cohort, "tag": tag}}
    path = server.log.with_name(f"{tag}-{cohort}.toml")
    path.write_text(server.api("POST", "/api/v1/devices", json=body)["agent_toml"])
    sim = SimDevice(DeviceProvisioning.load(path))
    server.sims.append(sim)
    sim.connect()
    return sim


def _send(sim: SimDevice, sha: str, seq: int, shift: float, rng: np.random.Generator, n: int = 400) -> None:
    """One telemetry window through the broker, on the device's own telemetry topic, QoS 1 (as the agent sends)."""
    end = datetime.now(UTC)
    x = rng.normal(size=(n, 4))
    x[:, 1] += shift
    window = TelemetryWindow(
        boot_id=sim.boot_id,
        seq=seq,
        model_name="digits",
        version="1.0.0",
        bundle_sha256=sha,
        window_start=end - timedelta(seconds=10),
        window_end=end,
        request_count=n,
        error_count=0,
        latency_counts=[n] + [0] * len(LATENCY_EDGES_MS),
        features=[FeatureSummary(input="x", feature=j, edges=EDGES, counts=_hist(x[:, j])) for j in range(4)],
    )
    assert sim.client is not None
    info = sim.client.publish(device_topic(sim.device_id, Channel.TELEMETRY), window.model_dump_json(), qos=1)
    info.wait_for_publish(timeout=10)


def test_a_shifted_feature_reaches_a_webhook_with_a_valid_hmac(
    tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker, make_bundle: BundleFactory, hook: object
) -> None:
    from .alert_receivers import Receiver

    assert isinstance(hook, Receiver)
    argv, commands_out = recorder_command(tmp_path)
    server = ServerProcess(tmp_path, db_url, keys, mqtt_broker, workers=2)
    server.env.update(
        {
            "EDGEOTA_SERVER_ALERT_RULES_FILE": str(_rules_file(tmp_path, hook.url, argv)),
            "EDGEOTA_SERVER_ALERT_EVAL_SECONDS": "0.5",
            "EDGEOTA_TEST_HOOK_SECRET": SECRET,
        }
    )
    rng = np.random.default_rng(21)
    reference = ReferenceStats(
        sample_count=20_000,
        features=[
            FeatureReference(input="x", feature=j, edges=EDGES, counts=_hist(rng.normal(size=20_000))) for j in range(4)
        ],
    )
    with server.running():
        sha = publish(server, make_bundle("1.0.0", "x86", reference=reference.model_dump_json().encode()))[
            "bundle_sha256"
        ]
        tag = f"a{uuid.uuid4().hex[:8]}"
        north, south = _device(server, "north", tag), _device(server, "south", tag)
        for seq in range(1, 4):
            _send(north, sha, 1000 + seq, 1.0, rng)
            _send(south, sha, 1000 + seq, 0.0, rng)

        fired = wait_for(lambda: [r for r in hook.accepted() if r.json["event"] == "fired"], 60, "a signed delivery")
        assert all(r.problem is None for r in hook.received), [r.problem for r in hook.received]
        (delivery,) = fired
        alert = delivery.json["alert"]
        assert alert["rule"] == "digits-drift" and alert["features"] == ["x[1]"] and "x[1]" in alert["summary"]
        assert alert["scope"]["cohort"] == "north" and alert["severity"] == "critical"
        assert delivery.headers["X-Edgeota-Event"] == "fired"

        ran = wait_for(lambda: recorded(commands_out), 60, "the command delivery")
        (call,) = ran
        export_dir = Path(call["env"]["EDGEOTA_ALERT_EXPORT_DIR"])
        assert export_dir.is_dir() and call["stdin"]["alert"]["id"] == alert["id"]
        assert call["manifest"]["trigger"] == f"alert:{alert['id']}"

        listed = _cli(server, "alerts", "list", "--output", "json")
        (record,) = json.loads(listed)
        assert record["id"] == alert["id"] and record["export"]["path"] == str(export_dir)
        assert {d["target"]: d["state"] for d in record["deliveries"]} == {
            "oncall": "delivered",
            "retrain": "delivered",
        }
        assert "acknowledged" in _cli(server, "alerts", "ack", alert["id"], "--reason", "on it")

        resp = server.http.get("/metrics")  # an API worker answers; the alert loop runs in the core process
        assert resp.status_code == 200
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text)
            for s in family.samples
        }
        assert samples[("edgeota_alerts_total", ())] == 1
        key = (("kind", "drift"), ("rule", "digits-drift"), ("severity", "critical"), ("state", "acknowledged"))
        assert samples[("edgeota_alerts_open", key)] == 1
    assert len(hook.accepted()) == 1  # de-duplicated: many rounds, one delivery; nothing for south or errors


def _cli(server: ServerProcess, *args: str) -> str:
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN, "COLUMNS": "250"}
    result = subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_bad_rules_file_stops_the_server_with_one_line(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> None:
    rules = tmp_path / "alerts.toml"
    rules.write_text('[[rules]]\nname = "x"\nkind = "cpu"\nmodel = "digits"\n')
    server = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'bad.db'}", keys, mqtt_broker)
    env = {**server.env, "EDGEOTA_SERVER_ALERT_RULES_FILE": str(rules)}
    result = subprocess.run(
        [EDGEOTA, "server", "run", "--port", str(server.port)], env=env, capture_output=True, text=True, timeout=60
    )
    server.http.close()
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"invalid alert rules file {rules}: rules.0.kind" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
