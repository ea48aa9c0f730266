"""Idle scale: N emulated devices connected and idle, and what server, brokers and devices cost then.

``python -m bench.scale_bench --idle-devices 50000 [--idle-seconds 120] [--ingest 0]`` (see ``bench/README.md``).

The server side is exactly the rollout runs' (:func:`bench.scale_bench.bench_run`): the local stack's Mosquitto as
the *core* broker, a fresh PostgreSQL database, ``edgeota server run`` and, with ``--ingest N``, N ingest
processes. Past it, what one process cannot hold is split (the descriptor hard limit is 20,000 a process, and the
connections from one source address to one broker address share ~28,000 ephemeral ports):

- **brokers**: K *edge* Mosquitto brokers (:mod:`edgeota.fleet.bridges`, at most 16,000 devices each), bridged to
  the core, stand in for a clustered broker; devices log in on them with the password file and ACL that
  ``edgeota broker config`` writes from the server's database;
- **devices**: S shard processes (:mod:`edgeota.emulator.shard`, at most 15,000 devices each), each on its own
  loopback source address (127.0.0.2, 127.0.0.3 ...), shard ``s`` on edge ``s mod K``.

Steps: provision N devices through the API, write the broker configuration, start the edges and the shards,
wait until every device is connected and the server acknowledged (so applied) a check-in of each, then measure for
``idle_seconds``: CPU cores used (CPU seconds over wall seconds) and steady and peak RSS of the server processes, the
core broker, each edge and their sum, and the shards; check-ins sent against those the server acknowledged. Then
the shards clear their retained presence and disconnect, the core is checked for retained messages left, and every
process stops. The entry (``"mode": "idle"``) goes to the end of ``scale.json``; goals are reported, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.idle_measure import Sampler, connections, cpu_cores, mosquitto_version, retained_count, with_descendants
from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from edgeota.emulator.shard import MAX_DEVICES_PER_SHARD, ShardConfig, write_config
from edgeota.fleet.bridges import MAX_DEVICES_PER_EDGE, EdgeBroker, edge_brokers
from edgeota.fleet.stack import local_stack, prepare_workdir, server_env
from edgeota.procs import Child, Supervisor
from edgeota_contract.provisioning import DeviceProvisioning

STAND_IN = (
    "{k} edge Mosquitto brokers bridged to one core broker stand in for a clustered broker: one Mosquitto process "
    "cannot hold this many sockets under a 20,000-descriptor limit. Device messages cross two brokers (edge, then "
    "core) where a cluster would cross one or two nodes; each edge imports only its own devices' command topics."
)


@dataclass(frozen=True)
class IdleLayout:
    """How N devices are split: ``shards[s]`` devices in shard ``s``, which connects to edge ``edge_of[s]``."""

    shards: tuple[int, ...]
    edge_of: tuple[int, ...]
    edges: int

    @property
    def edge_devices(self) -> list[int]:
        totals = [0] * self.edges
        for size, edge in zip(self.shards, self.edge_of, strict=True):
            totals[edge] += size
        return totals

    def source_address(self, shard: int) -> str:
        return f"127.0.0.{2 + shard}"


def plan_layout(devices: int, shards: int | None = None, edges: int | None = None) -> IdleLayout:
    """Split ``devices`` evenly over ``shards`` shard processes and ``edges`` edge brokers (fewest that fit when None).

    Raises:
        ValueError: no device, more shards than devices or than loopback addresses (253), or a shard or an edge
            over its limit (:data:`MAX_DEVICES_PER_SHARD`, :data:`MAX_DEVICES_PER_EDGE`).
    """
    if devices < 1:
        raise ValueError(f"idle mode needs at least one device, not {devices}")
    shards = shards or -(-devices // MAX_DEVICES_PER_SHARD)
    if not 1 <= shards <= min(devices, 253):
        raise ValueError(f"{shards} shards for {devices} devices: use 1 to {min(devices, 253)}")
    if -(-devices // shards) > MAX_DEVICES_PER_SHARD:
        raise ValueError(f"{-(-devices // shards)} devices in a shard (at most {MAX_DEVICES_PER_SHARD}): more shards")
    edges = edges or -(-devices // MAX_DEVICES_PER_EDGE)
    if not 1 <= edges <= shards:
        raise ValueError(f"{edges} edge brokers for {shards} shards: use 1 to {shards} (a shard uses one edge)")
    base, extra = divmod(devices, shards)
    sizes = tuple(base + (1 if s < extra else 0) for s in range(shards))
    layout = IdleLayout(sizes, tuple(s % edges for s in range(shards)), edges)
    if max(layout.edge_devices) > MAX_DEVICES_PER_EDGE:
        raise ValueError(f"{max(layout.edge_devices)} devices on an edge (at most {MAX_DEVICES_PER_EDGE}): more edges")
    return layout


def _read_status(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data
    return {}


KEYS: tuple[str, ...] = ("connected", "checkins_sent", "checkins_acked", "devices_acked", "unacked")
KEYS += ("presence_not_cleared", "disconnects_aborted")  # written by a shard when it stops


def _totals(paths: Sequence[Path]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for path in paths:
        status = _read_status(path)
        for key in KEYS:
            totals[key] += int(status.get(key, 0))
    return dict(totals)


def _progress(msg: str) -> None:
    print(f"[idle {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _shards(
    layout: IdleLayout,
    edges: list[EdgeBroker],
    provisions: list[DeviceProvisioning],
    workdir: Path,
    options: ShardConfig,
) -> Iterator[tuple[list[Child], list[Path]]]:
    """Start the shard processes; on exit SIGTERM them all at once and wait for their clean stop."""
    children: list[Child] = []
    statuses: list[Path] = []
    with Supervisor(workdir / "logs", grace=120.0) as supervisor:
        start = 0
        for s, size in enumerate(layout.shards):
            edge = edges[layout.edge_of[s]]
            lines = "".join(p.model_dump_json() + "\n" for p in provisions[start : start + size])
            start += size
            folder = workdir / f"shard-{s}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "devices.jsonl").write_text(lines, encoding="utf-8")
            config = ShardConfig(
                **{
                    **options.__dict__,
                    "provisioning_file": str(folder / "devices.jsonl"),
                    "broker_host": edge.host,
                    "broker_port": edge.port,
                    "status_file": str(folder / "status.json"),
                    "bind_address": layout.source_address(s),
                }
            )
            write_config(folder / "shard.json", config)
            argv = [sys.executable, "-m", "edgeota.emulator.shard", str(folder / "shard.json")]
            children.append(supervisor.start(f"shard-{s}", argv))
            statuses.append(folder / "status.json")
        try:
            yield children, statuses
        finally:
            for child in children:  # all at once: each clears its presence and disconnects in parallel
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
            for child in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.popen.wait(timeout=120)


def _wait_checked_in(
    children: list[Child], statuses: list[Path], devices: int, timeout: float
) -> tuple[float | None, float | None]:
    """Seconds until every device is connected, and until every device has an acknowledged check-in (None: not)."""
    t0 = time.monotonic()
    connected_at: float | None = None
    last_print = 0.0
    while time.monotonic() - t0 < timeout:
        dead = [c.name for c in children if not c.alive()]
        if dead:
            raise RuntimeError(f"shard process exited early: {dead[0]} (see {children[0].log_path})")
        totals = _totals(statuses)
        now = time.monotonic() - t0
        if connected_at is None and totals.get("connected", 0) >= devices:
            connected_at = now
        if totals.get("devices_acked", 0) >= devices and totals.get("connected", 0) >= devices:
            return connected_at, now
        if now - last_print >= 10:
            last_print = now
            _progress(f"{totals.get('connected', 0)} connected, {totals.get('devices_acked', 0)} checked in")
        time.sleep(1.0)
    return connected_at, None


def idle_run(
    devices: int,
    ingest_processes: int,
    database: str,
    idle_seconds: float,
    layout: IdleLayout,
    connect_per_second: float = 250.0,
    heartbeat_seconds: float = 60.0,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """One idle run (see the module docstring); never raises for what it measures, records an error instead."""
    from bench.scale_bench import PROFILE, WORK, _database, _stored_windows, start_ingest

    workdir = prepare_workdir(workdir or WORK / f"idle-{devices}-{ingest_processes}-{database}")
    prefix = f"i{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {"devices": devices, "emulated": True, "mode": "idle", "ingest_processes": ingest_processes}
    out.update(database=database, committed=0, seconds_to_all_committed=None, seconds_halt_to_all_reverted=None)
    with _database(database, workdir) as db_url:
        extra = {  # the rollout runs' server settings (bench_run)
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_DEVICE_HEARTBEAT_TIMEOUT_SECONDS": "600",
            "EDGEOTA_SERVER_INGEST_RATE_PER_DEVICE": "50",
        }
        if ingest_processes:
            group = f"scale{uuid.uuid4().hex[:6]}"
            extra.update({"EDGEOTA_SERVER_MQTT_SHARED_GROUP": group, "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"})
        with local_stack(workdir, "mosquitto", server_env_extra=extra) as stack:
            env = {
                **server_env(
                    workdir / "server",
                    1,
                    stack.broker,
                    stack.admin_token,
                    stack.release_key_path.with_name("release.pub.pem"),
                ),
                **extra,
            }
            server_pids = [child.pid for child in stack.supervisor.children]
            server_pids += start_ingest(stack, ingest_processes, extra)
            try:
                emulator = EmulatorConfig(
                    devices=devices,
                    server_url=stack.server_url,
                    admin_token=stack.admin_token,
                    profiles=(PROFILE,),
                    prefix=prefix,
                    provision_threads=8,
                )
                _phases(
                    stack, env, emulator, layout, server_pids, idle_seconds, connect_per_second, heartbeat_seconds, out
                )
                stored, distinct = _stored_windows(db_url, prefix)
                out.update(telemetry_stored=distinct, telemetry_doubled=stored - distinct)
            except Exception as exc:  # keep what was measured before it broke
                out["error"] = repr(exc)[:500]
    return out


def _phases(
    stack: Any,
    env: dict[str, str],
    emulator: EmulatorConfig,
    layout: IdleLayout,
    server_pids: list[int],
    idle_seconds: float,
    connect_per_second: float,
    heartbeat_seconds: float,
    out: dict[str, Any],
) -> None:
    """Provision, configure, connect, measure, stop; each figure goes into ``out`` as soon as it is known."""
    from ota_server.client import ApiClient

    n, workdir = emulator.devices, stack.workdir
    t0 = time.monotonic()

    def provisioned(count: int) -> None:
        if count % 5000 == 0 or count == n:
            _progress(f"provisioned {count} of {n} ({count / max(1e-9, time.monotonic() - t0):.0f}/s)")

    with EmulatedFleet(emulator) as registrar:
        provisions = registrar.provision(provisioned)
    out["seconds_to_provision"] = round(time.monotonic() - t0, 1)
    _progress(f"{n} devices provisioned in {out['seconds_to_provision']} s; writing the broker configuration")
    auth = workdir / "edge-auth"
    argv = [sys.executable, "-m", "edgeota.cli", "broker", "config", "--out", str(auth)]
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"edgeota broker config failed ({done.returncode}): {done.stderr.strip()[-300:]}")

    groups: list[list[str]] = [[] for _ in range(layout.edges)]
    start = 0
    for s, size in enumerate(layout.shards):
        groups[layout.edge_of[s]] += [p.device.id for p in provisions[start : start + size]]
        start += size
    out["brokers"] = {
        "kind": mosquitto_version(),
        "core": "the rollout runs' broker: the server and ingest processes, and one bridge per edge",
        "edges": [{"name": f"edge-{i}", "devices": len(g)} for i, g in enumerate(groups)],
        "stand_in": STAND_IN.format(k=layout.edges),
        "edge_auth": "password file and ACL from `edgeota broker config` (each device its own topics)",
    }
    options = ShardConfig(
        provisioning_file="",
        broker_host="",
        broker_port=0,
        status_file="",
        heartbeat_seconds=heartbeat_seconds,
        connect_per_second=connect_per_second / len(layout.shards),
    )
    out["shards"] = {
        "count": len(layout.shards),
        "devices": list(layout.shards),
        "edge": list(layout.edge_of),
        "source_addresses": [layout.source_address(s) for s in range(len(layout.shards))],
        "connect_per_second": connect_per_second,
        "heartbeat_seconds": heartbeat_seconds,
        "resend": "the emulated device's schedule for unacknowledged messages",
    }
    with edge_brokers(stack.broker, auth, groups, workdir / "edges") as edges:
        _progress(f"{len(edges)} edge brokers bridged; starting {len(layout.shards)} shards")
        with _shards(layout, edges, provisions, workdir, options) as (children, statuses):
            names = {"server": with_descendants(server_pids), "broker_core": [stack.broker.pid]}
            names |= {e.name: [e.pid] for e in edges}
            names |= {c.name: [c.pid] for c in children}
            names |= {"broker_edges": [e.pid for e in edges], "devices": [c.pid for c in children]}
            names["brokers_total"] = [stack.broker.pid, *names["broker_edges"]]
            sampler = Sampler(names)
            try:
                _measure(stack, children, statuses, n, idle_seconds, edges, sampler, names, out, ApiClient.connect)
            finally:
                sampler.stop()
                out["peak_rss_mb"] = {
                    "server": round(sampler.peak["server"], 1),
                    "broker": round(sampler.peak["brokers_total"], 1),
                    "devices": round(sampler.peak["devices"], 1),
                }
                out.setdefault("idle", {})["rss_mb_peak"] = {k: round(v, 1) for k, v in sampler.peak.items()}
        final = _totals(statuses)
        out["idle"]["presence_not_cleared"] = final.get("presence_not_cleared", 0)
        out["idle"]["disconnects_aborted"] = final.get("disconnects_aborted", 0)
        out["idle"]["shards_stopped_cleanly"] = [_read_status(p).get("phase") for p in statuses].count("stopped")
        time.sleep(2.0)  # the edges forward the last clearing messages to the core
        out["retained_left_on_core"] = retained_count(stack.broker.host, stack.broker.port)
    out["telemetry_sent"] = 0  # idle devices run no model, so they send no telemetry window


def _measure(
    stack: Any,
    children: list[Child],
    statuses: list[Path],
    n: int,
    idle_seconds: float,
    edges: list[EdgeBroker],
    sampler: Sampler,
    names: dict[str, list[int]],
    out: dict[str, Any],
    api_client: Callable[..., Any],
) -> None:
    timeout = max(180.0, 2 * n / max(1.0, float(out["shards"]["connect_per_second"])) + 120)
    connected, checked_in = _wait_checked_in(children, statuses, n, timeout)
    out["seconds_to_connect"] = None if connected is None else round(connected, 1)
    out["seconds_to_all_checked_in"] = None if checked_in is None else round(checked_in, 1)
    idle: dict[str, Any] = out.setdefault("idle", {})
    idle["connections"] = {"broker_core": connections(stack.broker.pid)} | {e.name: connections(e.pid) for e in edges}
    _progress(f"all checked in: {checked_in is not None}; measuring {idle_seconds:.0f} s of idle")
    with api_client(stack.server_url, stack.admin_token) as api:
        metrics_before = api.request("GET", "/api/v1/metrics")
        before, start = _totals(statuses), sampler.mark()
        time.sleep(idle_seconds)
        end, after = sampler.mark(), _totals(statuses)
        metrics_after = api.request("GET", "/api/v1/metrics")
    idle["seconds"] = round(end[0] - start[0], 1)
    idle["cpu_cores"] = cpu_cores(names, start, end)
    idle["rss_mb_steady"] = {k: round(sum(v) / len(v), 1) if v else None for k, v in sampler.window.items()}
    idle["connected_at_start"], idle["connected_at_end"] = before.get("connected", 0), after.get("connected", 0)
    idle["checkins"] = {
        "sent": after.get("checkins_sent", 0) - before.get("checkins_sent", 0),
        "acked_by_server": after.get("checkins_acked", 0) - before.get("checkins_acked", 0),
        "unacked_at_end": after.get("unacked", 0),
        "expected": round(n * idle["seconds"] / float(out["shards"]["heartbeat_seconds"])),
    }
    # The API process's counters only (ingest processes count their own): which outcomes it applied meanwhile.
    idle["server_ingest_counters"] = {
        k: metrics_after.get(k, 0) - metrics_before.get(k, 0)
        for k in sorted(set(metrics_after) | set(metrics_before))
        if k.startswith("ingest_") and metrics_after.get(k, 0) != metrics_before.get(k, 0)
    }
    idle["kb_per_device"] = {
        "devices": round(1024 * (idle["rss_mb_steady"]["devices"] or 0) / n, 1),
        "brokers_total": round(1024 * (idle["rss_mb_steady"]["brokers_total"] or 0) / n, 1),
    }


def idle_goals(run: dict[str, Any]) -> dict[str, str]:
    """Issue 18's idle goal is a measurement, not a threshold: say whether it was taken, at what size."""
    idle = run.get("idle") or {}
    if run.get("devices", 0) < 50_000:
        verdict = "n/a (fewer than 50,000 devices)"
    elif "cpu_cores" in idle and idle.get("connected_at_end") == run["devices"]:
        verdict = "measured"
    else:
        verdict = f"not reached ({idle.get('connected_at_end', 0)} of {run['devices']} connected)"
    return {"connected_and_idle_at_50000": verdict}


def run_idle(
    target: Path,
    devices: int,
    ingest: list[int],
    database: str,
    idle_seconds: float,
    layout: IdleLayout,
    connect_per_second: float,
    heartbeat_seconds: float,
) -> list[dict[str, Any]]:
    """One idle run per ingest process count, each appended to the JSON list in ``target`` as it ends."""
    target.parent.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    for processes in ingest:
        try:
            entry = idle_run(devices, processes, database, idle_seconds, layout, connect_per_second, heartbeat_seconds)
        except Exception as exc:  # a stack that did not start is recorded too
            entry = {"devices": devices, "emulated": True, "mode": "idle", "ingest_processes": processes}
            entry.update(database=database, error=repr(exc)[:500])
        entry["goals"] = idle_goals(entry)
        entry["machine_cores"] = os.cpu_count()
        entry["available_memory_mb"] = round(psutil.virtual_memory().available / 2**20)
        runs: list[Any] = []
        with contextlib.suppress(OSError, ValueError):  # read again: other runs may have ended meanwhile
            loaded = json.loads(target.read_text(encoding="utf-8"))
            runs = loaded if isinstance(loaded, list) else loaded.get("runs", [])
        runs.append(entry)
        target.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    return entries
