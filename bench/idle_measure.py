"""What the idle-scale mode measures about processes and brokers: CPU, RSS, connections, retained messages.

Used by :mod:`bench.scale_idle`. :class:`Sampler` reads RSS and CPU seconds of a set of processes every second (no
descriptor count: listing 15,000 descriptors costs CPU that would be measured), summed per named group.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections import Counter
from typing import Any

import psutil


class Sampler:
    """Every ``interval`` s, RSS and CPU seconds of every process; sums per named group (a pid may be in several).

    Lighter than :class:`bench.fleet_bench.Peaks` (no descriptor count: listing 15,000 descriptors costs CPU that
    would be measured). :meth:`mark` opens and closes the measurement window.
    """

    def __init__(self, groups: dict[str, list[int]], interval: float = 1.0) -> None:
        self.groups = groups
        self.procs = {pid: psutil.Process(pid) for pids in groups.values() for pid in pids}
        self.cpu: dict[int, float] = {}
        self.peak = dict.fromkeys(groups, 0.0)
        self.window: dict[str, list[float]] = {name: [] for name in groups}
        self.in_window = False
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="idle-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        rss: dict[int, float] = {}
        for pid, proc in self.procs.items():
            with contextlib.suppress(psutil.Error), proc.oneshot():
                rss[pid] = proc.memory_info().rss / 2**20
                times = proc.cpu_times()
                self.cpu[pid] = times.user + times.system
        with self._lock:
            for name, pids in self.groups.items():
                total = sum(rss.get(pid, 0.0) for pid in pids)
                self.peak[name] = max(self.peak[name], total)
                if self.in_window:
                    self.window[name].append(total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self) -> Mark:
        """A fresh sample: (monotonic time, CPU seconds per pid); the window opens or closes around it."""
        with self._lock:
            self.in_window = not self.in_window
        self._sample()
        return time.monotonic(), dict(self.cpu)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


Mark = tuple[float, dict[int, float]]


def cpu_cores(groups: dict[str, list[int]], start: Mark, end: Mark) -> dict[str, float]:
    """CPU cores each group used between two marks (CPU seconds over wall seconds)."""
    wall = max(1e-9, end[0] - start[0])
    return {
        name: round(sum(end[1].get(p, 0.0) - start[1].get(p, 0.0) for p in pids) / wall, 3)
        for name, pids in groups.items()
    }


def with_descendants(pids: list[int]) -> list[int]:
    """``pids`` and every process they started (an API server with workers runs several)."""
    out = list(pids)
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out += [child.pid for child in psutil.Process(pid).children(recursive=True)]
    return out


def connections(pid: int) -> dict[str, Any]:
    """Established TCP connections of a broker process, by the peer's address."""
    peers: Counter[str] = Counter()
    with contextlib.suppress(psutil.Error):
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.status == psutil.CONN_ESTABLISHED and conn.raddr:
                peers[conn.raddr.ip] += 1
    return {"established": sum(peers.values()), "by_peer_address": dict(sorted(peers.items()))}


def retained_count(host: str, port: int, prefix: str = "", wait: float = 2.0) -> int:
    """Retained messages with a payload the broker at ``host:port`` holds (anonymous login), topics under ``prefix``."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: set[str] = set()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgeota-retained-probe-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda _c, _u, m: (
        seen.add(m.topic) if m.retain and m.payload and m.topic.startswith(prefix) else None
    )
    client.connect(host, port)
    client.loop_start()
    try:
        client.subscribe("#", qos=0)
        time.sleep(wait)
    finally:
        client.disconnect()
        client.loop_stop()
    return len(seen)


def mosquitto_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5).stdout
        return out.splitlines()[0].strip() if out else "mosquitto"
    return "mosquitto"
