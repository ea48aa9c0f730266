"""One process of an emulated fleet split over several: ``python -m edgeota.emulator.shard CONFIG.json``.

A process cannot hold more sockets than its descriptor hard limit (20,000 where the benchmarks run), and the
connections from one source address to one broker address share one range of ephemeral ports (about 28,000),
so a fleet of 50,000 connected devices runs as several shards, each on its own loopback source address
(``127.0.0.2``, ``127.0.0.3`` ...). ``CONFIG.json`` (:class:`ShardConfig`) names a JSON-lines file of device
provisioning (one ``DeviceProvisioning`` a line, as the server returned it), the broker every device of this
shard connects to, the source address, and ``status_file``.

The shard raises its soft descriptor limit to the hard limit, connects its devices (emulated devices,
:mod:`edgeota.emulator.device`, on one shared MQTT loop) at ``connect_per_second``, and keeps them idle: each
checks in every ``heartbeat_seconds`` and re-sends an unacknowledged check-in on the emulated device's schedule
(:meth:`EmulatedDevice.resend_due`). Every ``status_seconds`` it rewrites ``status_file`` (:func:`status`):
devices connected, check-ins sent and acknowledged by the server (the server acknowledges a message only once it
is committed), devices with at least one acknowledged check-in, its RSS. On SIGTERM or SIGINT it clears every
retained presence message its devices left (waiting for the broker to acknowledge each), ends each session with
a DISCONNECT (so no last will is published) and writes a last status with ``"phase": "stopped"``.

Exit codes: 0 after a clean stop, 2 for a bad configuration (one ``error:`` line on stderr).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from edgeota.emulator.device import EmulatedDevice
from edgeota.emulator.fleet import EmulatedFleet, EmulatorConfig
from edgeota.fleet.bridges import raise_open_file_limit
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.messages import CheckIn, StatusReport, TelemetryWindow
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.topics import Channel

MAX_DEVICES_PER_SHARD = 15_000
"""Devices one shard takes: a socket each under the 20,000-descriptor hard limit, and room for the rest."""


@dataclass(frozen=True)
class ShardConfig:
    provisioning_file: str
    """JSON lines, one ``DeviceProvisioning`` each."""
    broker_host: str
    broker_port: int
    status_file: str
    bind_address: str = ""
    """Source address of every device connection ('' lets the kernel choose)."""
    heartbeat_seconds: float = 60.0
    connect_per_second: float = 250.0
    status_seconds: float = 2.0
    workers: int = 4


def load_config(path: Path) -> ShardConfig:
    """The :class:`ShardConfig` in the JSON file at ``path``.

    Raises:
        EdgeotaError: unreadable file, a missing field or one ShardConfig does not take.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(ShardConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        config = ShardConfig(**data)
    except (OSError, ValueError, TypeError) as exc:
        raise EdgeotaError(f"bad shard configuration {path}: {exc}") from None
    return config


def write_config(path: Path, config: ShardConfig) -> None:
    path.write_text(json.dumps(asdict(config)), encoding="utf-8")


def load_provisioning(path: Path, host: str, port: int) -> list[DeviceProvisioning]:
    """The devices in the JSON-lines file at ``path``, each pointed at the broker ``host:port``.

    Raises:
        EdgeotaError: unreadable file or a line that is not a device's provisioning (its line number named).
    """
    out: list[DeviceProvisioning] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EdgeotaError(f"cannot read {path}: {exc.strerror or exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            prov = DeviceProvisioning.model_validate_json(line)
        except ValueError as exc:
            raise EdgeotaError(f"{path}:{number}: not a device provisioning: {str(exc).splitlines()[0]}") from None
        out.append(prov.model_copy(update={"mqtt": prov.mqtt.model_copy(update={"host": host, "port": port})}))
    return out


class ShardDevice(EmulatedDevice):
    """An emulated device that connects from ``bind_address`` and counts its check-ins and their acks.

    It extends two internals of :class:`EmulatedDevice`: the client it builds (same session, plus a source
    address) and its send path (to note which message ids were check-ins).
    """

    def __init__(
        self,
        prov: DeviceProvisioning,
        http: httpx.Client,
        work: Callable[[str, Callable[[], None]], None],
        bind_address: str = "",
    ) -> None:
        self.bind_address = bind_address  # read by _make_client, which the base constructor calls
        self.checkins_sent = 0
        self.checkins_acked = 0
        self._checkins_pending: list[str] = []
        super().__init__(prov, http, work)

    def _make_client(self) -> mqtt.Client:
        client = super()._make_client()
        # connect_async only records where to connect: calling it again replaces the address and adds the bind.
        client.connect_async(self.prov.mqtt.host, self.prov.mqtt.port, keepalive=60, bind_address=self.bind_address)
        return client

    def _send(self, channel: Channel, msg: StatusReport | CheckIn | TelemetryWindow) -> None:
        super()._send(channel, msg)
        if channel == Channel.CHECKIN:
            # Noted after the send put it among the unacknowledged: whatever is pending and no longer there was acked.
            with self.lock:
                self.checkins_sent += 1
                self._checkins_pending.append(msg.msg_id)

    def checkin_tally(self) -> tuple[int, int]:
        """(check-ins sent, check-ins the server acknowledged); re-sends of one check-in count once."""
        with self.lock:
            pending = [m for m in self._checkins_pending if m in self.unacked]
            self.checkins_acked += len(self._checkins_pending) - len(pending)
            self._checkins_pending = pending
            return self.checkins_sent, self.checkins_acked


def rss_mb() -> float:
    import psutil

    rss: int = psutil.Process().memory_info().rss
    return round(rss / 2**20, 1)


def status(devices: list[ShardDevice], phase: str, started: float) -> dict[str, Any]:
    """What the shard reports: counts over its devices, its RSS, and the time it took to count."""
    t0 = time.perf_counter()
    sent = acked = seen = connected = unacked = 0
    for device in devices:
        s, a = device.checkin_tally()
        sent, acked, seen = sent + s, acked + a, seen + int(a > 0)
        connected += int(device.connected.is_set())
        unacked += len(device.unacked)
    return {
        "phase": phase,
        "pid": os.getpid(),
        "devices": len(devices),
        "connected": connected,
        "checkins_sent": sent,
        "checkins_acked": acked,
        "devices_acked": seen,
        "unacked": unacked,
        "rss_mb": rss_mb(),
        "uptime_s": round(time.monotonic() - started, 1),
        "status_ms": round((time.perf_counter() - t0) * 1000, 1),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


def run(config: ShardConfig) -> int:
    """Connect the shard's devices and keep them idle until SIGTERM or SIGINT (see the module docstring)."""
    from edgeota.procs import Terminated, signals_raise

    started = time.monotonic()
    status_file = Path(config.status_file)
    limit = raise_open_file_limit()
    provisions = load_provisioning(Path(config.provisioning_file), config.broker_host, config.broker_port)
    if len(provisions) > MAX_DEVICES_PER_SHARD or len(provisions) + 200 > limit:
        raise EdgeotaError(f"{len(provisions)} devices do not fit one shard (open-file limit {limit})")
    cfg = EmulatorConfig(
        devices=len(provisions),
        server_url=provisions[0].server.url if provisions else "",
        admin_token="",
        heartbeat_seconds=config.heartbeat_seconds,
        telemetry_seconds=3600.0 * 24,  # idle devices run no model, so they would send no window anyway
        workers=config.workers,
    )
    fleet = EmulatedFleet(cfg)
    devices = [ShardDevice(p, fleet.http, fleet.loop.dispatch, config.bind_address) for p in provisions]
    fleet.devices.extend(devices)
    phase = ["connecting"]
    done = threading.Event()

    def report() -> None:  # a thread of its own: connecting at a paced rate blocks the main thread for minutes
        while True:
            write_json(status_file, {**status(devices, phase[0], started), "open_file_limit": limit})
            if done.wait(config.status_seconds):
                return

    reporter = threading.Thread(target=report, name="shard-status", daemon=True)
    reporter.start()
    with signals_raise():
        try:
            fleet.start(connect_per_second=config.connect_per_second)
            phase[0] = "running"
            while True:
                time.sleep(3600)
        except (KeyboardInterrupt, Terminated):
            pass
        finally:
            phase[0] = "stopping"
            left = fleet.leave(timeout=60.0)
            done.set()
            reporter.join()
            final = status(devices, "stopped", started)
            write_json(status_file, {**final, **left, "open_file_limit": limit})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("error: usage: python -m edgeota.emulator.shard CONFIG.json", file=sys.stderr)
        return 2
    try:
        return run(load_config(Path(args[0])))
    except EdgeotaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
