"""MQTT ingest benchmark of the OTA server (``python -m bench.server_bench --ingest``).

Starts Mosquitto (``edgeota.broker``, fleet limits) and ``edgeota server run`` on SQLite or a throwaway
PostgreSQL database, registers N devices and starts a rollout covering them, then publishes every
device's reports at once over a few connections (presence, check-in, four status reports and
telemetry windows shaped like a digits-model agent's, some re-sent) and waits until the server has
acknowledged every one; acks follow the commit, so acked = stored. The old path
(``ingest_batch_max=0``) and the batched writers run in the same invocation. Results are merged
under ``"ingest"`` into ``bench/results/server_bench.json``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.ingest_processes import start_ingest_processes, stop_processes
from bench.server_bench import ADMIN, _bundle, _free_port, _with_pg_database
from ota_server.client import ApiClient, ApiClientError

INGEST_BEFORE = 0  # ingest_batch_max=0: the old path, one transaction per message on paho's network thread
INGEST_AFTER = 200


def _window(device_id: str, seq: int, boot: str, sha: str) -> bytes:
    """A telemetry window shaped like a digits-model agent's: 16 input features, class and confidence counts."""
    from edgeota_contract.messages import TelemetryWindow
    from edgeota_contract.telemetry import CONFIDENCE_EDGES, LATENCY_EDGES_MS, FeatureSummary, OutputSummary

    edges = [i / 8 for i in range(1, 16)]
    now = datetime.now(UTC)
    return (
        TelemetryWindow(
            boot_id=boot,
            seq=seq,
            model_name="bench",
            version="1.0.0",
            bundle_sha256=sha,
            window_start=now,
            window_end=now,
            request_count=600,
            error_count=seq % 3,
            latency_counts=[(i * 7 + seq) % 50 for i in range(len(LATENCY_EDGES_MS) + 1)],
            features=[
                FeatureSummary(
                    input="x",
                    feature=f,
                    edges=edges,
                    counts=[(f + i + seq) % 60 for i in range(len(edges) + 1)],
                    min=0.0,
                    max=2.0,
                    sum=512.25 + f,
                    sum_sq=901.5 + f,
                )
                for f in range(16)
            ],
            outputs=[
                OutputSummary(
                    output="y",
                    class_counts=[60 + (i + seq) % 7 for i in range(10)],
                    confidence_counts=[(i + seq) % 90 for i in range(len(CONFIDENCE_EDGES) + 1)],
                )
            ],
        )
        .model_dump_json()
        .encode()
    )


def _device_traffic(
    device_id: str, deployment_id: str, sha: str, windows: int
) -> tuple[list[tuple[str, bytes]], dict[str, set[str]]]:
    """One device's reports in the order an agent sends them, with every 5th window sent twice (a re-send).

    Returns ``(topic, payload)`` pairs and the unique msg ids per kind (status, checkin, telemetry).
    """
    from edgeota_contract.messages import CheckIn, Presence, StatusReport, new_id
    from edgeota_contract.states import DeploymentState
    from edgeota_contract.topics import Channel, device_topic

    boot, seq, assignment = new_id(), 0, new_id()
    out: list[tuple[str, bytes]] = []
    ids: dict[str, set[str]] = {"status": set(), "checkin": set(), "telemetry": set()}
    presence = Presence(online=True, boot_id=boot).model_dump_json().encode()
    out.append((device_topic(device_id, Channel.PRESENCE), presence))
    checkin = CheckIn(boot_id=boot, seq=0, hardware_profile="x86", agent_version="bench")
    out.append((device_topic(device_id, Channel.CHECKIN), checkin.model_dump_json().encode()))
    ids["checkin"].add(checkin.msg_id)

    def report(state: DeploymentState) -> None:
        nonlocal seq
        seq += 1
        msg = StatusReport(
            boot_id=boot,
            seq=seq,
            deployment_id=deployment_id,
            assignment_id=assignment,
            state=state,
            model_name="bench",
            version="1.0.0",
            bundle_sha256=sha,
        )
        out.append((device_topic(device_id, Channel.STATUS), msg.model_dump_json().encode()))
        ids["status"].add(msg.msg_id)

    report(DeploymentState.DOWNLOADING)
    report(DeploymentState.INSTALLING)
    for w in range(windows):
        payload = _window(device_id, w, boot, sha)
        out.append((device_topic(device_id, Channel.TELEMETRY), payload))
        ids["telemetry"].add(json.loads(payload)["msg_id"])
        if w % 5 == 4:
            out.append((device_topic(device_id, Channel.TELEMETRY), payload))
        if w == windows // 2:
            report(DeploymentState.TRIAL)
    report(DeploymentState.COMMITTED)
    return out, ids


class _AckCounter:
    """Subscribes to every device's command topic and collects the msg ids the server acknowledged."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.acked: set[str] = set()
        self.ack_messages = 0
        self.last_ack = 0.0
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-ack-counter", protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe("edgeota/v1/devices/+/cmd", qos=1)
        self.ready.wait(10)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        body = json.loads(json.loads(msg.payload)["body"])
        if body.get("kind") == "ack":
            with self.lock:
                self.acked.update(body["msg_ids"])
                self.ack_messages += 1
                self.last_ack = time.perf_counter()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(host: str, port: int, streams: list[list[tuple[str, bytes]]], clients: int) -> float:
    """Publish every device's stream (QoS 1) over ``clients`` connections, devices interleaved, each in order.

    A device always uses the same connection, so the broker keeps its order. Returns the start time.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    conns = []
    for i in range(clients):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{i}", protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(1000)
        c.connect(host, port)
        c.loop_start()
        conns.append(c)
    start = time.perf_counter()

    def run(index: int) -> None:
        mine = streams[index::clients]
        last = None
        for step in range(max((len(s) for s in mine), default=0)):
            for stream in mine:
                if step < len(stream):
                    last = conns[index].publish(stream[step][0], stream[step][1], qos=1)
        if last is not None:
            last.wait_for_publish(600)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.disconnect()
        c.loop_stop()
    return start


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far of each named process (0.0 for one that is gone); this process as ``bench``."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            times = psutil.Process(pid).cpu_times()
            out[name] = times.user + times.system
        except psutil.Error:
            out[name] = 0.0
    return out


def run_ingest(
    database: str,
    devices: int,
    windows: int,
    batch_max: int,
    workers: int | None,
    ingest_processes: int = 0,
    ingest_protocol: str | None = None,
) -> dict[str, Any]:
    """One server (real process, real Mosquitto) ingesting every device's reports at once; stored per second.

    ``ingest_processes`` > 0: that many ``edgeota server ingest`` processes share the device topics (shared
    subscription group ``ingest``) and ``edgeota server run`` only publishes (``mqtt_subscribe = false``);
    ``ingest_protocol`` (``"5"``, ``"3.1.1"``) sets their MQTT version (default: the server's ``auto``, MQTT 5).
    The result includes the CPU seconds each part used from the first publish to the last ack (``cpu_s``): the
    bench process (its 4 publishing connections and the ack counter), the broker, ``server run`` and each ingest
    process.
    """
    from sqlalchemy import create_engine, func, select

    from edgeota.broker import start_broker
    from ota_server.models import Deployment, DeviceMessage, StatusEvent, TelemetryRecord

    with tempfile.TemporaryDirectory(prefix="edgeota-ingest-") as tmp:
        work = Path(tmp)
        bundle, pub = _bundle(work)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        db_url = f"sqlite:///{work / 'bench.db'}" if database == "sqlite" else database
        with start_broker("mosquitto", data_dir=work / "broker") as broker:
            env = {
                **os.environ,
                "EDGEOTA_SERVER_DATABASE_URL": db_url,
                "EDGEOTA_SERVER_DATA_DIR": str(work / "data"),
                "EDGEOTA_SERVER_ADMIN_TOKEN": ADMIN,
                "EDGEOTA_SERVER_RELEASE_KEYS": str(pub),
                "EDGEOTA_SERVER_MQTT_HOST": broker.host,
                "EDGEOTA_SERVER_MQTT_PORT": str(broker.port),
                "EDGEOTA_SERVER_LOG_LEVEL": "WARNING",
                "EDGEOTA_SERVER_PUBLIC_URL": url,
                "EDGEOTA_SERVER_INGEST_BATCH_MAX": str(batch_max),
                **({"EDGEOTA_SERVER_INGEST_WORKERS": str(workers)} if workers else {}),
                **(
                    {"EDGEOTA_SERVER_MQTT_SHARED_GROUP": "ingest", "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"}
                    if ingest_processes
                    else {}
                ),
            }
            exe = str(Path(sys.executable).with_name("edgeota"))
            proc = subprocess.Popen(
                [exe, "server", "run", "--port", str(port)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            db = create_engine(db_url)
            acks = None
            ingesters: list[subprocess.Popen[bytes]] = []
            try:
                api = ApiClient.connect(url, ADMIN, 60)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    try:
                        if api.health().mqtt_connected:
                            break
                    except ApiClientError:
                        pass
                    time.sleep(0.2)
                if ingest_processes:  # after `server run` migrated the database
                    ingest_env = {
                        **env,
                        **({"EDGEOTA_SERVER_MQTT_PROTOCOL": ingest_protocol} if ingest_protocol else {}),
                    }
                    ingesters = start_ingest_processes(exe, ingest_env, work, ingest_processes)
                release = api.upload(bundle).release_id
                for i in range(devices):
                    api.provision("x86", device_id=f"ing-{i:05d}")
                rollout = api.create_rollout(release, {"stages": [{"percent": 100}]}, start=True).rollout_id
                while api.rollout(rollout, deployments=False).counts["notified"] < devices:
                    time.sleep(0.2)
                with db.connect() as conn:
                    deps = conn.execute(select(Deployment.device_id, Deployment.id, Deployment.bundle_sha256)).all()
                streams: list[list[tuple[str, bytes]]] = []
                expected: dict[str, set[str]] = {"status": set(), "checkin": set(), "telemetry": set()}
                for device_id, dep_id, sha in deps:
                    stream, ids = _device_traffic(device_id, dep_id, sha, windows)
                    streams.append(stream)
                    for kind, values in ids.items():
                        expected[kind] |= values
                want = set().union(*expected.values())
                sent = sum(len(s) for s in streams)
                window_bytes = [len(p) for s in streams for t, p in s if t.endswith("/telemetry")]
                acks = _AckCounter(broker.host, broker.port)
                metrics_before = api.metrics()
                load_before = os.getloadavg()
                pids = {"bench": os.getpid(), "broker": broker.pid, "server_run": proc.pid}
                pids.update({f"ingest_{k}": p.pid for k, p in enumerate(ingesters)})
                cpu_before = _cpu_seconds(pids)
                start = _publish(broker.host, broker.port, streams, 4)
                published = time.perf_counter() - start
                publish_cpu = _cpu_seconds({"bench": os.getpid()})["bench"] - cpu_before["bench"]
                deadline = time.monotonic() + max(300.0, sent / 10)
                while time.monotonic() < deadline and not want <= acks.acked:
                    time.sleep(0.2)
                elapsed = (acks.last_ack or time.perf_counter()) - start
                load_after = os.getloadavg()
                cpu_used = {k: round(v - cpu_before[k], 2) for k, v in _cpu_seconds(pids).items()}
                time.sleep(1.0)
                metrics = api.metrics()
                with db.connect() as conn:
                    stored = {
                        "telemetry_windows": conn.scalar(select(func.count()).select_from(TelemetryRecord)),
                        "status_events": conn.scalar(select(func.count()).select_from(StatusEvent)),
                        "status_msg_ids": conn.scalar(select(func.count()).select_from(DeviceMessage)),
                        "committed": conn.scalar(
                            select(func.count()).select_from(Deployment).where(Deployment.state == "committed")
                        ),
                    }
                    keys = (TelemetryRecord.device_id, TelemetryRecord.boot_id, TelemetryRecord.seq)
                    distinct_windows = select(*keys).distinct().subquery()
                    distinct_events = select(StatusEvent.deployment_id, StatusEvent.state).distinct().subquery()
                    stored["telemetry_windows_doubled"] = (stored["telemetry_windows"] or 0) - (
                        conn.scalar(select(func.count()).select_from(distinct_windows)) or 0
                    )
                    stored["status_events_doubled"] = (stored["status_events"] or 0) - (
                        conn.scalar(select(func.count()).select_from(distinct_events)) or 0
                    )
            finally:
                if acks is not None:
                    acks.close()
                stop_processes(ingesters)
                db.dispose()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    unique = len(want)
    complete = want <= acks.acked
    delta = {k: v - metrics_before.get(k, 0) for k, v in metrics.items() if k.startswith("ingest_")}
    return {
        "database": "sqlite" if database == "sqlite" else "postgresql",
        "ingest_batch_max": batch_max,
        "ingest_workers": 0 if batch_max == 0 else workers or (1 if database == "sqlite" else 2),
        "ingest_processes": ingest_processes,
        "sent_stored_doubled": {
            "telemetry": [len(expected["telemetry"]), stored["telemetry_windows"], stored["telemetry_windows_doubled"]],
            "status": [len(expected["status"]), stored["status_events"], stored["status_events_doubled"]],
        },
        "path": "old: one transaction per message on the network thread" if batch_max == 0 else "batched writers",
        "devices": devices,
        "messages_sent": sent,
        "unique_reports": unique,
        "sent": {k: len(v) for k, v in expected.items()},
        "stored": stored,
        "sent_equals_stored": complete
        and stored["telemetry_windows"] == len(expected["telemetry"])
        and stored["status_events"] == len(expected["status"])
        and stored["status_msg_ids"] == len(expected["status"]),
        "all_acked": complete,
        "ack_messages": acks.ack_messages,
        "telemetry_window_bytes": round(sum(window_bytes) / max(1, len(window_bytes))),
        "ingest_protocol": ingest_protocol or ("auto" if ingest_processes else None),
        "publish_s": round(published, 2),
        "publish_cpu_s": round(publish_cpu, 2),
        "cpu_s": cpu_used,
        "elapsed_s": round(elapsed, 2),
        "messages_per_s": round(sent / elapsed, 1),
        "stored_per_s": round(unique / elapsed, 1),
        "server_ingest_counters": delta,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }


INGEST_MATRIX = (
    ("sqlite", INGEST_BEFORE, None),
    ("sqlite", INGEST_AFTER, None),
    ("postgresql", INGEST_BEFORE, None),
    ("postgresql", INGEST_AFTER, 1),
    ("postgresql", INGEST_AFTER, 2),
)


def ingest_report(databases: list[str], devices: int, windows: int) -> dict[str, Any]:
    """Before (old path) and after (batched) on each database, in this one run."""
    runs = []
    for database, batch_max, workers in INGEST_MATRIX:
        if database not in databases:
            continue
        if database == "postgresql":
            runs.append(_with_pg_database(lambda url, b=batch_max, w=workers: run_ingest(url, devices, windows, b, w)))
        else:
            runs.append(run_ingest(database, devices, windows, batch_max, workers))
        print(json.dumps(runs[-1]), flush=True)
    return {
        "benchmark": "MQTT ingest: N devices' reports published at once through Mosquitto to one server process",
        "setup": f"{devices} devices x (presence, check-in, 4 status reports, {windows} telemetry windows, every 5th "
        "window re-sent); 4 publisher connections, QoS 1; rate = unique reports acked (acks follow the commit) per "
        "second from the first publish to the last ack; server engine running; publisher, broker, server and "
        "PostgreSQL share the machine's cores",
        "before": "ingest_batch_max=0 (the old path: one transaction per message on paho's network thread)",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "runs": runs,
    }


def merge(out: Path, key: str, value: dict[str, Any]) -> dict[str, Any]:
    """Write ``value`` under ``key`` into the JSON at ``out``, keeping what else is there."""
    data: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    data[key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data
