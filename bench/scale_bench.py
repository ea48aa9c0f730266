"""Scale benchmark: how many devices one server drives, measured with the light device emulator.

Each run starts its own stack: Mosquitto (fleet limits), a fresh PostgreSQL database (or SQLite), ``edgeota
server run`` and, with ``ingest_processes`` > 0, that many ``edgeota server ingest`` processes sharing the device
topics through an MQTT shared subscription (the API process then only publishes). Emulated devices
(:mod:`edgeota.emulator`: real MQTT sessions speaking the contract, real HTTP downloads with sha256 checks, no
ONNX Runtime) run in this process. Phases:

- **rollout**: release 1.0.0 to every device in one stage; seconds from ``start`` to every device committed;
- **rollout of 1.1.0**, then the server's ``rollback`` command: seconds from the command to every device
  serving 1.0.0 again (``seconds_halt_to_all_reverted``);
- **telemetry**: windows sent by the devices (every 60 s, the agent's default window) against rows stored, and doubles;
- **idle** (``--idle N``): N devices connected and idle for a while: CPU and memory of server and broker;
- **memory**: peak RSS of the server processes (summed), the broker, and this process (the devices).

Every entry says ``"emulated": true``: the emulator is the measure of the server; real agents
(``bench/fleet_bench.py``) remain the measure of agent behaviour. Results go to ``bench/results/scale.json``: a list of
runs, each with the fields issue 18 names (and more). Goals (reported, never asserted): 10,000 devices committed in
at most 60 s; every device reverted in at most 10 s after a halt; telemetry sent = stored; AWS IoT Jobs'
documented ceiling of 1,000 devices per minute as the baseline ratio.

``python -m bench.scale_bench --devices 1000,10000 --ingest 0,2 [--database postgresql|sqlite] [--append]``.

``--idle-devices N`` runs the idle mode instead (:mod:`bench.scale_idle`): N devices in several emulator processes
through edge brokers bridged to the server's broker, connected and idle; the entry it appends says ``"mode": "idle"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench.fleet_bench import Peaks
from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from edgeota.fleet.stack import Stack, local_stack, prepare_workdir, server_env
from ota_server.client import ApiClient, ApiClientError

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / ".work" / "scale"
PROFILE = "x86-avx2"
AWS_IOT_JOBS_PER_MINUTE = 1000.0
PG_ADMIN_URL = os.environ.get("EDGEOTA_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def _database(kind: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir / 'server' / 'edgeota.db'}"
        return
    import psycopg

    name = f"edgeota_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base.replace('postgresql://', 'postgresql+psycopg://', 1)}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _bundles(workdir: Path, key_path: Path) -> list[Path]:
    """Two small signed releases of the digits example for one profile (the emulator never runs them)."""
    from edgeota.fleet.releases import package_release
    from edgeota_contract.signing import load_private_key
    from packager.examples.digits import build_digits_example

    key = load_private_key(key_path)
    out: list[Path] = []
    for epochs, version in ((30, "1.0.0"), (60, "1.1.0")):
        model = build_digits_example(workdir / "models" / version, arch="mlp", seed=0, epochs=epochs)
        rel = package_release(
            model.model_path,
            model.calibration_path,
            model.eval_path,
            [PROFILE],
            key,
            workdir / "bundles" / version,
            "digits",
            version,
        )
        out.extend(rel.bundles.values())
    return out


def _wait(check: Callable[[], bool], timeout: float, interval: float = 0.5) -> float | None:
    """Seconds until ``check()`` holds (to ``interval``), or None after ``timeout``. ``check`` reads every emulated
    device (a fleet snapshot): at 10,000 devices polling it every 0.1 s took a fifth of the emulator's process,
    the cores the server under test shares."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(interval)
    return None


class _Ended:
    """Whether rollout ``rollout_id`` ended otherwise than completed (asks the API at most every 2 s)."""

    def __init__(self, api: ApiClient, rollout_id: str) -> None:
        self.api, self.rollout_id = api, rollout_id
        self.state: str | None = None
        self._asked = 0.0

    def __call__(self) -> bool:
        if self.state is None and time.monotonic() - self._asked >= 2.0:
            self._asked = time.monotonic()
            state = self.api.request("GET", f"/api/v1/rollouts/{self.rollout_id}?deployments=false").get("state")
            if state in ("rolled_back", "aborted", "paused"):
                self.state = str(state)
        return self.state is not None


def _stored_windows(db_url: str, prefix: str) -> tuple[int, int]:
    from sqlalchemy import create_engine, text

    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text(
                    "SELECT count(*), count(DISTINCT device_id || ':' || boot_id || ':' || CAST(seq AS TEXT)) "
                    "FROM telemetry_windows WHERE device_id LIKE :p"
                ),
                {"p": f"{prefix}-%"},
            ).one()
        return int(row[0]), int(row[1])
    finally:
        engine.dispose()


def start_ingest(stack: Stack, count: int, extra: dict[str, str]) -> list[int]:
    """``count`` ``edgeota server ingest`` processes on the stack's broker and database, under its supervisor;
    their pids. ``extra``: the server settings of the run (database, shared-subscription group)."""
    env = {
        **server_env(
            stack.workdir / "server",
            1,
            stack.broker,
            stack.admin_token,
            stack.release_key_path.with_name("release.pub.pem"),
        ),
        **extra,
        "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "true",
    }
    argv = [sys.executable, "-m", "edgeota.cli", "server", "ingest", "--instance"]
    return [stack.supervisor.start(f"ingest-{k}", [*argv, str(k)], env=env).pid for k in range(count)]


def bench_run(
    devices: int, ingest_processes: int, database: str, timeout: float, idle_seconds: float
) -> dict[str, Any]:
    """One run (see the module docstring); never raises for a missed goal, records it."""
    workdir = prepare_workdir(WORK / f"{devices}-{ingest_processes}-{database}")
    prefix = f"s{uuid.uuid4().hex[:6]}"
    group = f"scale{uuid.uuid4().hex[:6]}"
    out: dict[str, Any] = {"devices": devices, "emulated": True, "ingest_processes": ingest_processes}
    out["database"] = database
    with _database(database, workdir) as db_url:
        extra = {
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_DEVICE_HEARTBEAT_TIMEOUT_SECONDS": "600",
            "EDGEOTA_SERVER_INGEST_RATE_PER_DEVICE": "50",
        }
        if ingest_processes:
            extra.update({"EDGEOTA_SERVER_MQTT_SHARED_GROUP": group, "EDGEOTA_SERVER_MQTT_SUBSCRIBE": "false"})
        with local_stack(workdir, "mosquitto", server_env_extra=extra) as stack:
            server_pids = [child.pid for child in stack.supervisor.children]
            server_pids += start_ingest(stack, ingest_processes, extra)
            peaks = Peaks({"server": server_pids, "broker": [stack.broker.pid], "devices": [os.getpid()]})
            try:
                _phases(stack, devices, prefix, db_url, timeout, idle_seconds, peaks, out)
            except Exception as exc:  # keep what was measured before it broke
                out["error"] = repr(exc)[:500]
            finally:
                peak = peaks.stop()
                out["peak_rss_mb"] = {k: peak.get(k, 0.0) for k in ("server", "broker", "devices")}
                out["cpu_seconds"] = peaks.cpu_seconds()
                out["max_load_1min"] = round(peaks.max_load_1min, 2)
    return out


def _phases(
    stack: Any,
    devices: int,
    prefix: str,
    db_url: str,
    timeout: float,
    idle_seconds: float,
    peaks: Peaks,
    out: dict[str, Any],
) -> None:
    """Run the phases, writing each figure into ``out`` as soon as it is known."""
    bundles = _bundles(stack.workdir, stack.release_key_path)
    config = EmulatorConfig(
        devices=devices,
        server_url=stack.server_url,
        admin_token=stack.admin_token,
        profiles=(PROFILE,),
        prefix=prefix,
        telemetry_seconds=60.0,  # the agent's default telemetry_window_seconds
        heartbeat_seconds=60.0,  # the agent's default heartbeat_seconds
        workers=8,
    )
    with ApiClient.connect(stack.server_url, stack.admin_token) as api, EmulatedFleet(config) as fleet:
        releases = [api.upload(path).release_id for path in bundles]
        t0 = time.monotonic()
        fleet.add(fleet.provision())
        out["seconds_to_provision"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        fleet.start()
        connected = fleet.wait_connected(timeout)
        out["seconds_to_connect"] = round(time.monotonic() - t0, 1) if connected else None
        if idle_seconds:
            before = peaks.cpu_seconds()
            time.sleep(idle_seconds)
            after = peaks.cpu_seconds()
            out["idle_cpu_cores"] = {k: round((after[k] - before.get(k, 0.0)) / idle_seconds, 3) for k in after}

        def rollout(release_id: str) -> str:
            body = {
                "release_id": release_id,
                "selector": {"labels": {"fleet": prefix}},
                "stages": [{"percent": 100, "soak_seconds": 0}],
                "gates": {"device_timeout_seconds": timeout},
                "start": True,
            }
            rid: str = api.request("POST", "/api/v1/rollouts", json=body)["rollout_id"]
            return rid

        start = time.monotonic()
        first_id = rollout(releases[0])
        took = _wait(lambda: fleet.snapshot().versions.get("1.0.0", 0) >= devices, timeout)
        snap = fleet.snapshot()
        out["committed"] = snap.versions.get("1.0.0", 0)
        out["seconds_to_all_committed"] = round(took, 1) if took is not None else None
        if took:
            out["devices_per_minute"] = round(devices / took * 60, 1)
            out["ratio_to_aws_iot_jobs_ceiling"] = round(out["devices_per_minute"] / AWS_IOT_JOBS_PER_MINUTE, 2)
        out["rollout_wall_seconds"] = round(time.monotonic() - start, 1)
        if took is None:
            first = api.request("GET", f"/api/v1/rollouts/{first_id}?deployments=false")
            out["v1_rollout"] = {k: first.get(k) for k in ("state", "reason", "detail", "counts")}

        second = rollout(releases[1])
        ended = _Ended(api, second)
        on_v2 = _wait(lambda: fleet.snapshot().versions.get("1.1.0", 0) >= devices or ended(), timeout)
        if ended.state is not None:  # it ended by itself (a gate): the devices' 1.1.0 count is not a rollout time
            on_v2 = None
        out["seconds_to_all_committed_v2"] = round(on_v2, 1) if on_v2 is not None else None
        before = api.request("GET", f"/api/v1/rollouts/{second}?deployments=false")
        out["v2_rollout"] = {k: before.get(k) for k in ("state", "reason", "detail", "counts", "failures")}
        halted = before.get("state") in ("running", "completed")
        if halted:
            try:
                api.request("POST", f"/api/v1/rollouts/{second}/rollback", json={"reason": "scale bench"})
            except ApiClientError as exc:  # it ended by itself between the read and the command
                out["v2_rollout"]["rollback_refused"] = str(exc)[:200]
                halted = False
        if halted:
            back = _wait(lambda: fleet.snapshot().versions.get("1.0.0", 0) >= devices, timeout)
            out["seconds_halt_to_all_reverted"] = round(back, 1) if back is not None else None
            out["reverted"] = fleet.snapshot().versions.get("1.0.0", 0)
            if back is None:  # evidence: how the server sees the devices that did not come back
                status = api.request("GET", f"/api/v1/rollouts/{second}?deployments=false")
                out["halt_evidence"] = {k: status.get(k) for k in ("state", "counts", "revert")}
        else:  # it ended by itself (a gate fired): no manual halt to time; the entry says why
            out["seconds_halt_to_all_reverted"] = None

        fleet.stop_telemetry()
        drained = fleet.drain(timeout)
        final = fleet.snapshot()
        time.sleep(2.0)  # acknowledged means committed; a moment for the last aggregates
        stored, distinct = _stored_windows(db_url, prefix)
        out.update(
            telemetry_sent=final.telemetry_sent,
            telemetry_stored=distinct,
            telemetry_doubled=stored - distinct,
            telemetry_unacked_at_end=final.unacked if not drained else 0,
            download_mb=round(final.download_bytes / 2**20, 1),
            rejected_commands=final.rejected_commands,
            download_failures=final.download_failures,
        )


def _goals(run: dict[str, Any]) -> dict[str, str]:
    def verdict(ok: bool | None) -> str:
        return "not reached" if ok is None else ("met" if ok else "missed")

    if "devices" not in run:
        return {}
    commit = run.get("seconds_to_all_committed")
    revert = run.get("seconds_halt_to_all_reverted")
    goals = {
        "all_committed_within_60s_at_10000": verdict(None if commit is None else commit <= 60)
        if run["devices"] >= 10_000
        else "n/a (fewer than 10,000 devices)",
        "all_reverted_within_10s": verdict(None if revert is None else revert <= 10),
        "telemetry_sent_equals_stored": verdict(
            run.get("telemetry_sent") == run.get("telemetry_stored") and run.get("telemetry_doubled") == 0
        ),
    }
    return goals


def run(results_dir: Path, quick: bool) -> dict[str, Any]:
    """``make bench``: 200 emulated devices with 0 and 2 ingest processes when quick, else 1,000 and 10,000."""
    sizes = [200] if quick else [1000, 10_000]
    return run_matrix(results_dir, sizes, [0, 2], "postgresql", append=False, idle_seconds=0.0)


def run_matrix(
    results_dir: Path, sizes: list[int], ingest: list[int], database: str, append: bool, idle_seconds: float
) -> dict[str, Any]:
    results_dir.mkdir(parents=True, exist_ok=True)
    target = results_dir / "scale.json"
    runs: list[dict[str, Any]] = []
    if append and target.exists():
        with contextlib.suppress(ValueError):
            loaded = json.loads(target.read_text(encoding="utf-8"))
            runs = loaded if isinstance(loaded, list) else loaded.get("runs", [])
    for devices in sizes:
        timeout = max(120.0, devices / 20)
        for processes in ingest:
            try:
                entry = bench_run(devices, processes, database, timeout, idle_seconds)
            except Exception as exc:  # a stack that did not start is recorded, the other runs still run
                entry = {"devices": devices, "emulated": True, "ingest_processes": processes, "database": database}
                entry["error"] = repr(exc)[:500]
            entry["goals"] = _goals(entry)
            entry["machine_cores"] = os.cpu_count()
            entry["available_memory_mb"] = round(psutil.virtual_memory().available / 2**20)
            runs.append(entry)
            # The file is the list of runs itself (the format issue 18 names).
            target.write_text(json.dumps(runs, indent=2) + "\n", encoding="utf-8")
            print(json.dumps(entry), flush=True)
    return {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--devices", default="1000", help="comma-separated fleet sizes (emulated devices)")
    parser.add_argument("--ingest", default="0,2", help="comma-separated ingest process counts (0: the server ingests)")
    parser.add_argument("--database", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--idle", type=float, default=0.0, help="measure the connected, idle fleet for SECONDS")
    parser.add_argument("--append", action="store_true", help="add to bench/results/scale.json")
    parser.add_argument(
        "--real-agents", default="", help="comma-separated sizes of real-agent fleets instead (bench/scale_agents.py)"
    )
    idle = parser.add_argument_group("idle mode (bench/scale_idle.py): no rollout, N devices connected and idle")
    idle.add_argument("--idle-devices", type=int, default=0, metavar="N", help="run the idle mode with N devices")
    idle.add_argument("--idle-seconds", type=float, default=120.0, help="length of the measured idle window")
    idle.add_argument("--shards", type=int, default=0, help="emulator processes (default: fewest of <=15,000)")
    idle.add_argument("--edges", type=int, default=0, help="edge brokers (default: fewest of <=16,000 devices)")
    idle.add_argument("--connect-rate", type=float, default=250.0, help="device connections per second, in all")
    idle.add_argument("--heartbeat-seconds", type=float, default=60.0, help="check-in period (the agent's default)")
    idle.add_argument("--results", type=Path, default=RESULTS / "scale.json", help="the idle mode appends here")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.devices.split(",") if x]
    ingest = [int(x) for x in args.ingest.split(",") if x]
    if args.database == "sqlite" and any(ingest):
        parser.error("ingest processes need PostgreSQL (SQLite has one writer)")
    if args.real_agents:  # always appended: real-agent runs are long and kept beside the emulated ones
        from bench.scale_agents import run_real

        run_real(RESULTS, [int(x) for x in args.real_agents.split(",") if x], ingest, args.database)
        return 0
    if args.idle_devices:  # always appended to the list of runs
        from bench.scale_idle import plan_layout, run_idle

        try:
            layout = plan_layout(args.idle_devices, args.shards or None, args.edges or None)
        except ValueError as exc:
            parser.error(str(exc))
        run_idle(
            args.results,
            args.idle_devices,
            ingest,
            args.database,
            args.idle_seconds,
            layout,
            args.connect_rate,
            args.heartbeat_seconds,
        )
        return 0
    run_matrix(RESULTS, sizes, ingest, args.database, args.append, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
