"""Real processes for integration tests: the OTA server and device agents, started as the CLI starts them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import free_port

ADMIN_TOKEN = "admin-" + "x" * 32


@dataclass
class ServerHandle:
    url: str
    token: str
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=30)


def server_env(data_dir: Path, db_url: str, mqtt_port: int, release_pubs: list[Path], port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "EDGEOTA_SERVER_DATA_DIR": str(data_dir),
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEOTA_SERVER_RELEASE_KEYS": ",".join(str(p) for p in release_pubs),
            "EDGEOTA_SERVER_MQTT_HOST": "127.0.0.1",
            "EDGEOTA_SERVER_MQTT_PORT": str(mqtt_port),
            "EDGEOTA_SERVER_PUBLIC_URL": f"http://127.0.0.1:{port}",
        }
    )
    return env


@contextmanager
def running_server(data_dir: Path, db_url: str, mqtt_port: int, release_pubs: list[Path]) -> Iterator[ServerHandle]:
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "server.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeota.cli", "server", "run", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env(data_dir, db_url, mqtt_port, release_pubs, port),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    handle = ServerHandle(f"http://127.0.0.1:{port}", ADMIN_TOKEN, proc, log)
    try:
        wait_until(lambda: _healthy(handle), timeout=60, what=f"server healthy (log: {log})", proc=proc)
        yield handle
    finally:
        stop(proc)


def _healthy(handle: ServerHandle) -> bool:
    try:
        return httpx.get(f"{handle.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def running_agent(config: Path, extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    log = config.with_suffix(".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgeota.cli", "agent", "run", "--config", str(config)],
            env={**os.environ, **(extra_env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)


def wait_until(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    interval: float = 0.25,
    proc: subprocess.Popen[bytes] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
