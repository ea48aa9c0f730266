"""Ingest in several processes through MQTT shared subscriptions (real Mosquitto, real PostgreSQL).

An ``edgeota server run`` that only publishes (``mqtt_subscribe = false``) and two ``edgeota server ingest``
processes in one ``mqtt_shared_group``: devices' telemetry windows (re-sent until acknowledged, as agents do)
are each stored once, none lost, both processes took a share, and the aggregates (merged by addition from
both processes at once) equal the windows. Refusals: no group, a database not migrated.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from tests.conftest import Broker

from .conftest import Keys
from .procs import EDGEOTA, ServerProcess
from .test_fault_ingest import ResendingDevice, _register, _until

pytestmark = pytest.mark.integration


@contextmanager
def ingest_process(server: ServerProcess, instance: int) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    log = server.log.with_name(f"ingest-{instance}.log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [EDGEOTA, "server", "ingest", "--instance", str(instance)], env=server.env, stdout=out, stderr=out
        )
    try:
        _until(lambda: '"event": "ingest_started"' in log.read_text(), 30, f"ingest process {instance}")
        assert proc.poll() is None, log.read_text()
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _stopped_counts(log: Path) -> dict[str, int]:
    for line in reversed(log.read_text().splitlines()):
        if '"event": "ingest_stopped"' in line:
            entry = json.loads(line)
            return {k: int(v) for k, v in entry.items() if k.startswith("ingest")}
    raise AssertionError(f"no ingest_stopped in {log}")


def test_two_ingest_processes_share_the_load_and_store_each_window_once(
    tmp_path: Path, pg_url: str, keys: Keys, mqtt_broker: Broker
) -> None:
    group = f"g{uuid.uuid4().hex[:8]}"
    server = ServerProcess(tmp_path, pg_url, keys, mqtt_broker)
    server.env.update({"EDGEOTA_SERVER_MQTT_SHARED_GROUP": group, "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"})
    devices: list[ResendingDevice] = []
    with server.running():
        ids = [f"sh-{uuid.uuid4().hex[:6]}-{i}" for i in range(8)]
        for device_id in ids:
            _register(server, device_id)
        with ingest_process(server, 0) as (first, first_log), ingest_process(server, 1) as (second, second_log):
            try:
                devices = [ResendingDevice(mqtt_broker, device_id) for device_id in ids]
                for device in devices:
                    device.send(60)

                def resend_all() -> None:
                    for device in devices:
                        device.resend()

                _until(lambda: all(d.pending() == 0 for d in devices), 120, "every window acknowledged", resend_all)
            finally:
                for device in devices:
                    device.close()
            first.send_signal(signal.SIGTERM)
            second.send_signal(signal.SIGTERM)
            assert first.wait(timeout=30) == 0 and second.wait(timeout=30) == 0
        shares = [_stopped_counts(first_log).get("ingest_ok", 0), _stopped_counts(second_log).get("ingest_ok", 0)]
        assert all(share > 0 for share in shares), shares  # the broker split the messages between the two
        assert server.api("GET", "/api/v1/metrics").get("ingest_ok", 0) == 0  # the API process ingested nothing
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(plain) as conn:
        rows = conn.execute(
            "SELECT device_id, count(*), count(DISTINCT (boot_id, seq)) FROM telemetry_windows GROUP BY device_id"
        ).fetchall()
        requests = conn.execute(
            "SELECT coalesce(sum(requests), 0), coalesce(sum(windows), 0) FROM telemetry_aggregates"
        ).fetchone()
    assert sorted(rows) == sorted((device_id, 60, 60) for device_id in ids)  # none lost, none doubled
    assert requests is not None and (int(requests[0]), int(requests[1])) == (3 * 60 * len(ids), 60 * len(ids))


def test_ingest_refusals(tmp_path: Path, pg_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_SERVER_")}
    env.update({"EDGEOTA_SERVER_DATA_DIR": str(tmp_path / "d"), "EDGEOTA_SERVER_DATABASE_URL": pg_url})
    done = subprocess.run([EDGEOTA, "server", "ingest"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "needs mqtt_shared_group" in done.stderr and "Traceback" not in done.stderr
    env["EDGEOTA_SERVER_MQTT_SHARED_GROUP"] = "g1"
    done = subprocess.run([EDGEOTA, "server", "ingest"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not migrated" in done.stderr and "Traceback" not in done.stderr
    env["EDGEOTA_SERVER_MQTT_SHARED_GROUP"] = "bad group!"
    done = subprocess.run([EDGEOTA, "server", "ingest"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "mqtt_shared_group" in done.stderr and "Traceback" not in done.stderr
