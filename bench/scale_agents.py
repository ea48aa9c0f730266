"""Scale benchmark with real agents: the phases of ``bench/scale_bench.py``, driven by the fleet bench's machinery.

``python -m bench.scale_bench --real-agents 1000 --ingest 0`` runs, per size and ingest process count, one stack like
the emulated runs (Mosquitto, a fresh PostgreSQL database or SQLite, ``edgeota server run`` and N ``edgeota server
ingest`` processes on an MQTT shared subscription) and a fleet of real device agents
(:class:`bench.fleet_bench.ShardedFleet`: ``python -m edgeota.fleet.shard`` processes, the device agent's own code,
ONNX Runtime, real trials), then:

- **rollout**: release 1.0.0 to every device in one stage: seconds from the rollout's creation to every device
  committed *by its own state* (nothing in progress and its active slot holds 1.0.0, read from each agent's
  ``state.json``): ``seconds_to_all_committed``;
- **rollout of 1.1.0** the same way (``seconds_to_all_committed_v2``), then the server's ``rollback`` command on it:
  seconds until every device serves 1.0.0 again (the shards' status), ``seconds_halt_to_all_reverted``;
- **telemetry**: distinct windows the devices published (seen on the broker, re-sends counted once) against rows
  stored, and doubles, after the fleet stopped and flushed;
- **resources**: peak RSS and CPU seconds of the server processes, the broker and the simulator processes.

The agents run the fleet bench's settings (:data:`bench.fleet_bench.AGENT`: the agent's defaults for heartbeats,
telemetry windows and report re-sends; 5 s trials instead of the default 30 s, since hundreds of agents share the
machine's cores); the entry records them. Each entry says ``"emulated": false`` and is appended to
``bench/results/scale.json`` (existing runs are kept). The issue's goal for real agents, 1,000 devices committed in
at most 60 s, is reported in ``goals`` (met, missed, not reached, or n/a below 1,000 devices), never asserted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from bench.fleet_bench import (
    AGENT,
    HEALTHY_MAX_FAILURE_RATE,
    PROFILE,
    WORK,
    Peaks,
    ShardedFleet,
    Variant,
    WireCounter,
    _phase_result,
    _releases,
    _rollout,
    _wait,
    _wait_share,
    agent_settings,
    default_max_concurrent,
)
from bench.scale_bench import AWS_IOT_JOBS_PER_MINUTE, _database, _stored_windows, start_ingest
from edgeota.fleet.config import FAST_AGENT_SETTINGS
from edgeota.fleet.stack import local_stack, prepare_workdir
from ota_server.client import ApiClient, ApiClientError
from ota_server.client_plans import StagePlan

GOAL_DEVICES = 1000
GOAL_SECONDS = 60.0
VARIANT = Variant(phases=("install", "update", "rollback"))


def committed_version(state: Mapping[str, Any]) -> str | None:
    """The version a device runs with no deployment in progress (what it has committed, by its own
    ``state.json``), or None while a deployment runs or when no slot is active."""
    if state.get("deployment") is not None:
        return None
    slot = state.get("active_slot")
    info = (state.get("slots") or {}).get(slot) if slot else None
    if not isinstance(info, Mapping):
        return None
    version = (info.get("manifest") or {}).get("version")
    return str(version) if version is not None else None


class CommitWatcher:
    """Counts the devices under ``fleet_dir`` (``shard-*/<device>/state/state.json``) that committed ``version``,
    from ``start()`` on, on a thread; :meth:`result` gives the seconds from ``started_at`` until all ``devices``
    had it. A device once counted stays counted (within one rollout a device does not leave the version it
    committed), and a state file is re-read only when it was replaced or modified, so a poll of a large fleet
    stays cheap."""

    def __init__(self, fleet_dir: Path, version: str, devices: int, interval: float = 0.5) -> None:
        self.fleet_dir, self.version, self.devices, self.interval = fleet_dir, version, devices, interval
        self.done: set[Path] = set()
        self._seen: dict[Path, tuple[int, int, int]] = {}
        self._files: list[Path] = []
        self.started_at = time.monotonic()
        self.reached: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def count(self) -> int:
        """Devices that committed the version so far (reads the state files that changed since the last call)."""
        if len(self._files) < self.devices:
            self._files = sorted(self.fleet_dir.glob("shard-*/*/state/state.json"))
        for path in self._files:
            if path in self.done:
                continue
            with contextlib.suppress(OSError, ValueError):
                st = path.stat()
                # The agent replaces the file atomically (a new inode): two writes within one clock tick still differ.
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if self._seen.get(path) == stamp:
                    continue
                state = json.loads(path.read_text(encoding="utf-8"))
                self._seen[path] = stamp
                if committed_version(state) == self.version:
                    self.done.add(path)
        return len(self.done)

    def start(self) -> CommitWatcher:
        self.started_at = time.monotonic()
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            if self.count() >= self.devices:
                self.reached = time.monotonic() - self.started_at
                return
            self._stop.wait(self.interval)

    def result(self, timeout: float) -> float | None:
        """Wait at most ``timeout`` seconds more; the seconds to all committed, or None when not reached."""
        self._thread.join(max(0.0, timeout))
        self._stop.set()
        self._thread.join(5)
        return self.reached


def goals(entry: Mapping[str, Any]) -> dict[str, str]:
    """The issue's goals for a real-agent entry, each ``met``, ``missed``, ``not reached`` or ``n/a (...)``."""

    def verdict(ok: bool | None) -> str:
        return "not reached" if ok is None else ("met" if ok else "missed")

    commit = entry.get("seconds_to_all_committed")
    sent = entry.get("telemetry_sent")
    return {
        "real_agents_1000_committed_within_60s": verdict(None if commit is None else commit <= GOAL_SECONDS)
        if int(entry.get("devices", 0)) >= GOAL_DEVICES
        else "n/a (fewer than 1,000 devices)",
        "telemetry_sent_equals_stored": verdict(
            None if sent is None else sent == entry.get("telemetry_stored") and entry.get("telemetry_doubled") == 0
        ),
    }


def append_run(target: Path, entry: Mapping[str, Any]) -> list[Any]:
    """Append ``entry`` to the JSON list of runs at ``target`` (created when missing; a file in the older
    ``{"runs": [...]}`` shape is read as its list) and write it back; returns the list written.

    Raises:
        ValueError: ``target`` holds something that is neither such a list nor such an object.
    """
    runs: list[Any] = []
    if target.exists():
        loaded = json.loads(target.read_text(encoding="utf-8"))
        if isinstance(loaded, dict) and isinstance(loaded.get("runs"), list):
            loaded = loaded["runs"]
        if not isinstance(loaded, list):
            raise ValueError(f"{target} is not a JSON list of runs")
        runs = loaded
    runs.append(dict(entry))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
    return runs


def bench_agents(devices: int, ingest_processes: int, database: str, timeout: float = 0.0) -> dict[str, Any]:
    """One real-agent run (see the module docstring); a missed goal or a failed phase is recorded, not raised.

    ``timeout``: each wait gives up after this many seconds (0: 180 s, or 0.4 s per device above 450 devices).
    """
    logging.getLogger().setLevel(logging.ERROR)
    timeout = timeout or max(180.0, devices * 0.4)
    workdir = prepare_workdir(WORK / "scale-agents" / f"{devices}-{ingest_processes}-{database}")
    out: dict[str, Any] = {"devices": devices, "emulated": False, "ingest_processes": ingest_processes}
    out["database"] = database
    out["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out["agent_settings"] = {**FAST_AGENT_SETTINGS, **agent_settings(VARIANT)}
    out["agent_settings_note"] = (
        f"the agent's defaults for heartbeats, telemetry windows and report re-sends; trials of "
        f"{AGENT['trial_seconds']:g} s of probes (the agent's default: 30 s or 200 requests) and "
        f"{AGENT['health_latency_slack_ms']:g} ms latency slack, as the fleet bench, since the agents share the "
        "machine's cores; the fleet simulator's download back-off"
    )
    with _database(database, workdir) as db_url:
        extra = {"EDGEOTA_SERVER_DATABASE_URL": db_url}
        if ingest_processes:
            group = f"scaleagents{os.getpid()}"
            extra |= {"EDGEOTA_SERVER_MQTT_SHARED_GROUP": group, "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"}
        with (
            local_stack(workdir, "mosquitto", server_env_extra=extra) as stack,
            ApiClient.connect(stack.server_url, stack.admin_token, 120) as api,
        ):
            server_pids = [child.pid for child in stack.supervisor.children]
            server_pids += start_ingest(stack, ingest_processes, extra)
            v1, v2, _ = _releases(stack)
            ids = [api.upload(r.bundles[PROFILE]).release_id for r in (v1, v2)]
            wire = WireCounter(stack.broker.host, stack.broker.port)
            t0 = time.monotonic()
            fleet = ShardedFleet(stack, devices, workdir / "fleet", VARIANT)
            peaks = Peaks({"server": server_pids, "broker": [stack.broker.pid], "devices": fleet.pids})
            out["simulator_processes"] = len(fleet.pids)
            try:
                _phases(api, fleet, workdir / "fleet", devices, ids, (v1.version, v2.version), timeout, t0, out)
                fleet.stop()  # the agents close their last windows and send what they can
                wire_keys = len(wire.keys)
                _wait(lambda: _stored_windows(db_url, "b%")[1] >= wire_keys, 60, interval=1)
                rows, distinct = _stored_windows(db_url, "b%")  # shard prefixes b0, b1, ...: "b%-%" covers them
                out.update(telemetry_sent=wire_keys, telemetry_stored=distinct, telemetry_doubled=rows - distinct)
                out["telemetry_messages_on_the_wire"] = wire.messages
            except Exception as exc:  # keep what was measured before it broke
                out["error"] = repr(exc)[:500]
            finally:
                fleet.stop()
                wire.close()
                peak = peaks.stop()
                out["peak_rss_mb"] = {k: peak.get(k, 0.0) for k in ("server", "broker", "devices")}
                out["cpu_seconds"] = peaks.cpu_seconds()
                out["max_load_1min"] = round(peaks.max_load_1min, 2)
                out["min_available_memory_mb"] = round(peaks.min_available_mib)
    return out


def _phases(
    api: ApiClient,
    fleet: ShardedFleet,
    fleet_dir: Path,
    devices: int,
    ids: list[str],
    versions: tuple[str, str],
    timeout: float,
    t0: float,
    out: dict[str, Any],
) -> None:
    """Wait for the fleet, run both rollouts and the rollback, writing each figure into ``out`` once known."""

    def online() -> bool:
        with contextlib.suppress(ApiClientError):
            return len(api.devices("fleet=bench", devices + 10, online=True)) >= devices
        return False

    up = _wait(online, timeout, interval=2)
    out["seconds_to_all_online"] = round(time.monotonic() - t0, 1) if up is not None else None
    cap = default_max_concurrent(devices)
    gates = {"max_concurrent": cap} if cap else None
    last: dict[str, Any] = {}
    for key, release_id, version in (("", ids[0], versions[0]), ("_v2", ids[1], versions[1])):
        # Started before the rollout is created, as the emulated runs time it from the creating request.
        watcher = CommitWatcher(fleet_dir, version, devices).start()
        last, seconds = _rollout(
            api, release_id, [StagePlan(percent=100)], timeout, HEALTHY_MAX_FAILURE_RATE, extra_gates=gates
        )
        took = watcher.result(timeout - (time.monotonic() - watcher.started_at))
        out[f"seconds_to_all_committed{key}"] = round(took, 1) if took is not None else None
        out[f"committed{key}"] = watcher.count()
        out[f"server_view{key or '_v1'}"] = _phase_result(last, seconds, fleet_dir)
        if not key and took:
            out["devices_per_minute"] = round(devices / took * 60, 1)
            out["ratio_to_aws_iot_jobs_ceiling"] = round(out["devices_per_minute"] / AWS_IOT_JOBS_PER_MINUTE, 2)
    out["seconds_halt_to_all_reverted"] = None
    if last.get("state") != "completed":
        out["halt_skipped"] = f"the 1.1.0 rollout ended {last.get('state')}"
        return
    api.command(last["rollout_id"], "rollback", "scale bench: fleet-wide rollback")
    _, back, reached = _wait_share(lambda: fleet.serving(versions[0]), devices, timeout)
    out["seconds_halt_to_all_reverted"] = back
    out["reverted"] = reached


def run_real(results_dir: Path, sizes: list[int], ingest: list[int], database: str) -> list[dict[str, Any]]:
    """Run every size with every ingest process count; append each entry to ``results_dir/scale.json`` as it
    finishes (a run that fails to start is recorded with its error) and print it."""
    entries = []
    for devices in sizes:
        for processes in ingest:
            try:
                entry = bench_agents(devices, processes, database)
            except Exception as exc:  # a stack that did not start is recorded; the other runs still run
                entry = {"devices": devices, "emulated": False, "ingest_processes": processes, "database": database}
                entry["error"] = repr(exc)[:500]
            entry["goals"] = goals(entry)
            entry["machine_cores"] = os.cpu_count()
            entry["available_memory_mb"] = round(psutil.virtual_memory().available / 2**20)
            append_run(results_dir / "scale.json", entry)
            entries.append(entry)
            print(json.dumps(entry), flush=True)
    return entries
