"""A telemetry gate that never gets data, end to end: `edgeota server run --workers 2`, real Mosquitto,
simulated devices that send no telemetry, and the `edgeota` CLI.

A rollout with ``--max-p95-ratio`` used to end "completed, all stages passed" here. Now the stage waits
for data (``--gate-data-timeout``) and then halts with "gate p95_latency_ratio not evaluated: 0 of 100
requests"; a plan that opts to pass completes and says which gate did not run. ``/metrics`` (scraped
from an API worker, parsed by prometheus_client) shows the core's gate evaluations. SQLite and PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Broker

from .conftest import ADMIN, BundleFactory, Keys
from .procs import EDGEOTA, ServerProcess
from .simdevice import SimDevice
from .test_server_process import provision, publish, rollout_state, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, db_url, keys, mqtt_broker, workers=2).running() as proc:
        yield proc


def cli(server: ServerProcess, *args: str) -> str:
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN, "COLUMNS": "200"}
    result = subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_gate_without_data_halts_the_rollout_and_says_so(server: ServerProcess, make_bundle: BundleFactory) -> None:
    tag = f"g{uuid.uuid4().hex[:8]}"
    old = publish(server, make_bundle("1.0.0", "x86"))["release_id"]
    new = publish(server, make_bundle("1.1.0", "x86"))["release_id"]
    newer = publish(server, make_bundle("1.2.0", "x86"))["release_id"]
    sims = [SimDevice(p) for p in provision(server, 3, tag)]
    server.sims.extend(sims)
    for sim in sims:
        sim.connect()
    base = ["rollout", "create", "--label", f"tag={tag}", "--start"]
    first = cli(server, *base, "--release", old).strip()
    wait_for(lambda: rollout_state(server, first)["state"] == "completed", 60, "1.0.0 installed")
    assert rollout_state(server, first)["detail"] == "all stages passed"  # no telemetry gate: nothing to say

    gated = [*base, "--max-p95-ratio", "1.5", "--gate-data-timeout", "2"]
    rid = cli(server, *gated, "--release", new).strip()
    wait_for(lambda: rollout_state(server, rid)["state"] != "running", 60, "the gated rollout to end")
    status = rollout_state(server, rid)
    assert status["state"] == "rolled_back" and status["reason"] == "gate_failed", status
    assert status["halted_by"] == "not_evaluated"
    assert status["detail"] == "gate p95_latency_ratio not evaluated: 0 of 100 requests"
    (gate,) = status["gates"]
    assert (gate["name"], gate["state"], gate["have"], gate["need"], gate["threshold"]) == (
        "p95_latency_ratio",
        "not_evaluated",
        0,
        100,
        1.5,
    )
    assert status["telemetry"]["requests"] == 0 and status["telemetry"]["coverage"] is None
    shown = cli(server, "rollout", "status", rid)
    assert "p95_latency_ratio" in shown and "not evaluated" in shown and "0 of 100" in shown
    audit = server.api("GET", "/api/v1/audit", params={"entity_id": rid, "action": "rollout.rolled_back"})
    assert audit and audit[0]["after"]["gates"][0]["state"] == "not_evaluated"

    lenient = cli(server, *gated, "--on-missing-data", "pass", "--release", newer).strip()
    wait_for(lambda: rollout_state(server, lenient)["state"] != "running", 60, "the lenient rollout to end")
    done = rollout_state(server, lenient)
    assert done["state"] == "completed" and "all stages passed" not in done["detail"]
    assert "not evaluated" in done["detail"] and "p95_latency_ratio" in done["detail"]

    resp = server.http.get("/metrics")  # an API worker answers; the engine runs in the core process
    assert resp.status_code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }
    assert samples[("edgeota_gate_evaluations_total", (("gate", "p95_latency_ratio"), ("result", "not_evaluated")))] > 0
    assert samples[("edgeota_rollouts", (("state", "rolled_back"),))] == 1
    assert samples[("edgeota_rollouts", (("state", "completed"),))] == 2
    assert samples[("edgeota_ingest_messages_total", (("outcome", "ok"),))] > 0
