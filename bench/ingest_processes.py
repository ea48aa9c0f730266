"""``edgeota server ingest`` processes for the MQTT ingest benchmark (:mod:`bench.server_ingest`)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def start_ingest_processes(exe: str, env: dict[str, str], work: Path, n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` ``edgeota server ingest`` processes of one shared-subscription group, once each has subscribed."""
    procs = []
    logs = []
    for k in range(n):
        log_path = work / f"ingest-{k}.log"
        logs.append(log_path)
        with log_path.open("wb") as log_file:
            procs.append(
                subprocess.Popen(
                    [exe, "server", "ingest", "--instance", str(k)],
                    env={**env, "EDGEOTA_SERVER_LOG_LEVEL": "INFO"},
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                )
            )
    deadline = time.monotonic() + 120
    while not all("ingest_started" in p.read_text(errors="replace") for p in logs):
        if time.monotonic() > deadline or any(proc.poll() is not None for proc in procs):
            stop_processes(procs)
            raise RuntimeError(f"an ingest process did not start: {[p.read_text()[-500:] for p in logs]}")
        time.sleep(0.2)
    return procs


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
