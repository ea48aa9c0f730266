"""Fleet-scale benchmark: one machine, Mosquitto, the real server and N real agents in one process.

For each fleet size it measures, in one run with one stack:

- **rollout**: a small-bundle release to every device in one stage: time from ``start`` to every
  device committed, and devices per minute, beside AWS IoT Jobs' documented ceiling of 1,000/min;
- **manual fleet rollback**: ``POST /rollouts/{id}/rollback`` on that completed rollout: time until every
  device serves the previous version again (the server pushes a signed rollback to each device);
- **failed gate**: a deliberately slow release, canary 10% then everyone: time from the start to the
  gate halting the rollout, and from the halt to every affected device serving the previous model;
- **telemetry**: windows seen on the wire (distinct ``(device, boot, seq)``) vs rows the server stored;
- **memory**: peak RSS of the server, the broker and this simulator process;
- **HTTP polling baseline**: the same rollout when devices poll instead of being pushed to: a device
  starts its update at a uniformly random point of its poll interval, so the fleet is done after
  about one interval plus the install time measured above (computed, and labelled so).

``run(results_dir, quick)`` writes ``results_dir/fleet.json``. Sizes: 100 when ``quick``, else 1,000, or
``EDGEOTA_BENCH_FLEET_SIZES`` (comma-separated). Goals are reported, never asserted.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from edgeota.fleet.api import RolloutPlan, ServerApi, ServerApiError, StagePlan
from edgeota.fleet.releases import BuiltRelease, make_bad_release, package_release
from edgeota.fleet.stack import Stack, local_stack, prepare_workdir
from edgeota.procs import Supervisor

WORK = Path(__file__).resolve().parent / ".work"
PROFILE = "imx8mp-npu"  # the largest latency budget (100 ms): hundreds of agents share two cores here
AWS_IOT_JOBS_MAX_PER_MINUTE = 1000
MENDER_DEFAULT_POLL_SECONDS = 1800
REALISTIC_POLL_SECONDS = 300
# Agents of a big simulated fleet: slower heartbeats and retries, so the fleet's own chatter stays small.
AGENT = {
    "heartbeat_seconds": 60.0,
    "telemetry_window_seconds": 10.0,
    "report_retry_seconds": 10.0,
    "trial_seconds": 3.0,
    "trial_requests": 0,
    "trial_probe_interval_seconds": 1.0,
    # The bench measures rollout mechanics at scale, not health-check fidelity: with hundreds of agents on two
    # cores a 0.05 ms request can wait 100+ ms for a core. The bad release below is slower still.
    "health_latency_slack_ms": 150.0,
}
PER_SHARD = 120
BAD_SLOW_MATMULS = 3000  # ~150 ms per request on one x86 core


class Peaks:
    """Samples RSS every half second; a name may stand for several processes (their sum). Maxima in MiB."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = {name: [psutil.Process(pid) for pid in pids] for name, pids in groups.items()}
        self.peaks = dict.fromkeys(groups, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            for name, procs in self.groups.items():
                total = 0.0
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss / 2**20
                self.peaks[name] = max(self.peaks[name], total)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(5)
        return {k: round(v, 1) for k, v in self.peaks.items()}


class ShardedFleet:
    """The fleet as several ``edgeota fleet simulate`` processes of at most ``per_shard`` agents each.

    One process cannot carry more than ~140 agents here: paho-mqtt's network loop uses ``select()``, which
    fails for file descriptors above 1023, and each agent holds about seven (socket, SQLite spool, lock...).
    Each shard reports through a JSON status file; :meth:`status` adds them up.
    """

    def __init__(self, stack: Stack, devices: int, workdir: Path, per_shard: int, rate: float) -> None:
        self.supervisor = Supervisor(log_dir=workdir / "shard-logs")
        self.status_files: list[Path] = []
        shards = max(1, math.ceil(devices / per_shard))
        settings = [f"--agent-setting={k}={v}" for k, v in AGENT.items()]
        for i in range(shards):
            count = devices // shards + (1 if i < devices % shards else 0)
            status = workdir / f"shard-{i}.json"
            argv = [
                sys.executable,
                "-m",
                "edgeota.cli",
                "fleet",
                "simulate",
                "--devices",
                str(count),
                "--profiles",
                PROFILE,
                "--server",
                stack.server_url,
                "--token",
                stack.admin_token,
                "--workdir",
                str(workdir / f"shard-{i}"),
                "--prefix",
                f"b{i}",
                "--label",
                "fleet=bench",
                "--rate",
                str(rate),
                "--status-file",
                str(status),
                *settings,
            ]
            self.supervisor.start(f"shard-{i}", argv)
            self.status_files.append(status)

    @property
    def pids(self) -> list[int]:
        return [c.pid for c in self.supervisor.children]

    def status(self) -> dict[str, Any]:
        versions: dict[str, int] = {}
        served: dict[str, list[int]] = {}
        running = 0
        for path in self.status_files:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            running += int(data["running"])
            for version, n in data["versions"].items():
                versions[version] = versions.get(version, 0) + int(n)
            for version, (devs, reqs) in data["served"].items():
                acc = served.setdefault(version, [0, 0])
                acc[0] += int(devs)
                acc[1] += int(reqs)
        return {"running": running, "versions": versions, "served": served}

    def serving(self, version: str) -> int:
        return int(self.status()["versions"].get(version, 0))

    def stop(self) -> None:
        self.supervisor.stop_all()


class WireCounter:
    """Counts distinct telemetry windows published by devices, by subscribing like the server does."""

    def __init__(self, host: str, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.keys: set[tuple[str, str, int]] = set()
        self.messages = 0
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-wire", protocol=mqtt.MQTTv311)
        self.client.on_message = self._on_message
        self.client.connect(host, port)
        self.client.subscribe("edgeota/v1/devices/+/telemetry", qos=1)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        data = json.loads(msg.payload)
        with self._lock:
            self.messages += 1
            self.keys.add((msg.topic.split("/")[3], data["boot_id"], int(data["seq"])))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _stored_windows(db: Path) -> tuple[int, int]:
    with sqlite3.connect(db) as conn:
        rows, distinct = conn.execute(
            "SELECT COUNT(*), COUNT(DISTINCT device_id || '/' || boot_id || '/' || seq) FROM telemetry_windows"
        ).fetchone()
    return int(rows), int(distinct)


def _wait(predicate: Any, timeout: float, interval: float = 0.5) -> float | None:
    """Seconds until ``predicate()`` held, or None when it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


def _wait_share(count: Any, total: int, timeout: float) -> tuple[float | None, float | None]:
    """Seconds until ``count()`` reached 99% of ``total``, and until it reached all of it (None: not in time)."""
    started = time.monotonic()
    t99: float | None = None
    while time.monotonic() - started < timeout:
        done = count()
        elapsed = round(time.monotonic() - started, 2)
        if t99 is None and done >= 0.99 * total:
            t99 = elapsed
        if done >= total:
            return t99, elapsed
        time.sleep(0.5)
    return t99, None


def _releases(stack: Stack) -> tuple[BuiltRelease, BuiltRelease, BuiltRelease]:
    from packager.examples.digits import build_digits_example

    out = []
    for epochs, version in ((30, "1.0.0"), (300, "1.1.0")):
        model = build_digits_example(stack.workdir / "models" / version, arch="mlp", seed=0, epochs=epochs)
        out.append(
            package_release(
                model.model_path,
                model.calibration_path,
                model.eval_path,
                [PROFILE],
                stack.release_key,
                stack.workdir / "bundles" / version,
                "digits",
                version,
            )
        )
    bad = make_bad_release(
        out[0], stack.release_key, stack.workdir / "bundles" / "bad", "1.2.0", slow_matmuls=BAD_SLOW_MATMULS
    )
    return out[0], out[1], bad


def _rollout(api: ServerApi, release_id: str, stages: list[StagePlan], timeout: float) -> tuple[dict[str, Any], float]:
    plan = RolloutPlan(
        stages=stages,
        labels={"fleet": "bench"},
        device_timeout_seconds=timeout,
        max_failure_rate=0.2,
        min_count_for_failure_rate=5,
    )
    rollout = api.create_rollout(release_id, plan)
    started = time.monotonic()
    api.start_rollout(rollout["rollout_id"])
    try:
        final = api.wait_rollout(rollout["rollout_id"], timeout=timeout, interval=1.0)
    except ServerApiError:  # not terminal in time: report where it stood
        final = {**api.rollout(rollout["rollout_id"]), "timed_out_after_seconds": timeout}
    return final, time.monotonic() - started


def _reasons(rollout: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for dep in rollout.get("deployments", []):
        if dep.get("state") != "committed" and dep.get("mode", "install") == "install":
            key = f"{dep.get('state')}:{dep.get('reason')}"
            out[key] = out.get(key, 0) + 1
    return out


def bench_size(devices: int, save: Any = None) -> dict[str, Any]:
    """Every measurement for one fleet size (see the module docstring); ``save(out)`` after each phase."""

    def checkpoint() -> None:
        if save is not None:
            save(out)

    logging.getLogger().setLevel(logging.ERROR)
    workdir = prepare_workdir(WORK / f"fleet-{devices}")
    out: dict[str, Any] = {"devices": devices, "profile": PROFILE, "broker": "mosquitto"}
    with local_stack(workdir, "mosquitto") as stack, ServerApi(stack.server_url, stack.admin_token, 120) as api:
        v1, v2, bad = _releases(stack)
        ids = [api.upload_bundle(r.bundles[PROFILE])["release_id"] for r in (v1, v2, bad)]
        out["bundle_bytes"] = {r.version: r.bundles[PROFILE].stat().st_size for r in (v1, v2, bad)}
        wire = WireCounter(stack.broker.host, stack.broker.port)
        t = time.monotonic()
        fleet = ShardedFleet(stack, devices, workdir / "fleet", PER_SHARD, rate=0.2)
        peaks = Peaks(
            {"server": [stack.supervisor.children[0].pid], "broker": [stack.broker.pid], "simulator": fleet.pids}
        )
        out["simulator_processes"] = len(fleet.pids)
        try:
            online = _wait(
                lambda: len([d for d in api.devices("fleet=bench", devices + 10) if d["online"]]) >= devices,
                timeout=max(180, devices * 0.5),
                interval=2,
            )
            out["start_to_all_online_seconds"] = round(time.monotonic() - t, 2) if online is not None else None
            checkpoint()

            timeout = 180.0 if devices <= 100 else max(300.0, devices * 0.4)
            last: dict[str, Any] = {}
            for key, release_id in (("rollout_first_install", ids[0]), ("rollout_update", ids[1])):
                last, seconds = _rollout(api, release_id, [StagePlan(percent=100)], timeout)
                committed = last["counts"].get("committed", 0)
                out[key] = {
                    "state": last["state"],
                    "timed_out_after_seconds": last.get("timed_out_after_seconds"),
                    "seconds": round(seconds, 2),
                    "committed": committed,
                    "not_committed_reasons": _reasons(last),
                    "devices_per_minute": round(committed / seconds * 60, 1) if seconds else None,
                    "aws_iot_jobs_max_per_minute": AWS_IOT_JOBS_MAX_PER_MINUTE,
                }
                checkpoint()

            if last.get("state") == "completed":
                api.command(last["rollout_id"], "rollback", "bench: fleet-wide rollback")
                t99, t100 = _wait_share(lambda: fleet.serving(v1.version), devices, timeout)
                out["manual_rollback_all_devices"] = {
                    "seconds_to_99pct_serving_previous": t99,
                    "seconds_to_all_serving_previous": t100,
                    "serving": fleet.status()["versions"],
                }
            else:
                out["manual_rollback_all_devices"] = {"skipped": f"the update rollout ended {last.get('state')}"}
            checkpoint()

            final, seconds = _rollout(
                api, ids[2], [StagePlan(percent=10, soak_seconds=5), StagePlan(percent=100)], timeout
            )
            back = None
            if final["state"] in ("rolled_back", "paused", "aborted"):  # the gate halted it: measure the way back
                _, back = _wait_share(lambda: devices - fleet.serving(bad.version), devices, timeout)
            affected, served = fleet.status()["served"].get(bad.version, [0, 0])
            out["failed_gate"] = {
                "state": final["state"],
                "timed_out_after_seconds": final.get("timed_out_after_seconds"),
                "reason": final.get("reason"),
                "detail": final.get("detail"),
                "start_to_halt_seconds": round(seconds, 2),
                "halt_to_all_back_seconds": back,
                "stage_reached": final.get("current_stage"),
                "counts": {k: v for k, v in final["counts"].items() if v},
                "device_reasons": _reasons(final),
                "devices_that_served_bad_requests": affected,
                "bad_requests_served": served,
            }
            checkpoint()

            fleet.stop()  # agents close their last windows into their spools and flush what they can

            db = workdir / "server" / "edgeota.db"
            _wait(lambda: _stored_windows(db)[1] >= len(wire.keys), 60, interval=1)
            rows, distinct = _stored_windows(db)
            out["telemetry"] = {
                "windows_on_the_wire": len(wire.keys),
                "messages_on_the_wire": wire.messages,
                "rows_stored": rows,
                "distinct_stored": distinct,
                "lost": max(0, len(wire.keys) - distinct),
                "doubled": rows - distinct,
            }
        finally:
            fleet.stop()
            wire.close()
            out["peak_rss_mib"] = peaks.stop()
    install = out.get("rollout_update", {}).get("seconds")
    out["http_polling_baseline"] = {
        "method": "computed: a device notices an update at a uniformly random point of its poll interval",
        "poll_seconds": {"realistic_5min": REALISTIC_POLL_SECONDS, "mender_default": MENDER_DEFAULT_POLL_SECONDS},
        "expected_all_committed_seconds": {
            "realistic_5min": round(REALISTIC_POLL_SECONDS * devices / (devices + 1) + (install or 0), 1),
            "mender_default": round(MENDER_DEFAULT_POLL_SECONDS * devices / (devices + 1) + (install or 0), 1),
        },
        "push_measured_seconds": install,
    }
    return out


def run(results_dir: Path, quick: bool) -> dict[str, Any]:
    sizes_env = os.environ.get("EDGEOTA_BENCH_FLEET_SIZES")
    sizes = [int(s) for s in sizes_env.split(",")] if sizes_env else ([100] if quick else [1000])
    results: dict[str, Any] = {"sizes": [], "machine_cores": os.cpu_count(), "complete": False}
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / "fleet.json"

    def save(partial: dict[str, Any] | None = None) -> None:
        data = {**results, "sizes": [*results["sizes"], *([partial] if partial is not None else [])]}
        target.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    for n in sizes:
        results["sizes"].append(bench_size(n, save))
        save()
    results["complete"] = True
    save()
    return results


if __name__ == "__main__":
    import sys

    quick_run = "--quick" in sys.argv
    print(json.dumps(run(Path(__file__).resolve().parent / "results", quick_run), indent=2))
