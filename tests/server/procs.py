"""A real `edgeota server run` child process for integration tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Broker, free_port

from .conftest import ADMIN, AUTH, Keys
from .simdevice import SimDevice

EDGEOTA = str(Path(sys.executable).with_name("edgeota"))
AGENT_RUN = [sys.executable, "-m", "edgeota.cli", "agent", "run", "--config"]


@contextmanager
def agent_process(
    config: Path, command: list[str] | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``edgeota agent run --config CONFIG`` (or ``command``) as a child in its own session, logging to CONFIG.log.

    ``EDGEOTA_AGENT_*`` variables of the test's own environment are not passed on unless ``env`` names them; the
    process group gets SIGTERM at the end, then SIGKILL after 15 s.
    """
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_AGENT_")}
    child_env.update(env or {})
    with open(config.with_suffix(".log"), "ab") as log:
        proc = subprocess.Popen(
            command or [*AGENT_RUN, str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=child_env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


def wait_for_agent(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes],
    log: Path | None = None,
    interval: float = 0.2,
) -> Any:
    """``check()``'s first truthy value within ``timeout`` s; fails at once if the agent process exits."""
    tail = (lambda: f": {log.read_text()[-3000:]}") if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        assert proc.poll() is None, f"agent exited with {proc.returncode} while waiting for {what}{tail()}"
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}{tail()}")


class ServerProcess:
    def __init__(self, tmp_path: Path, db_url: str, keys: Keys, broker: Broker, workers: int = 0) -> None:
        self.workers = workers
        self.sims: list[SimDevice] = []  # disconnected by :meth:`running` on the way out
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "EDGEOTA_SERVER_DATABASE_URL": db_url,
            "EDGEOTA_SERVER_DATA_DIR": str(tmp_path / "server-data"),
            "EDGEOTA_SERVER_ADMIN_TOKEN": ADMIN,
            "EDGEOTA_SERVER_RELEASE_KEYS": str(keys.release_pub),
            "EDGEOTA_SERVER_MQTT_HOST": broker.host,
            "EDGEOTA_SERVER_MQTT_PORT": str(broker.port),
            "EDGEOTA_SERVER_MQTT_CLIENT_ID": f"srv-{uuid.uuid4().hex[:10]}",
            "EDGEOTA_SERVER_PUBLIC_URL": self.url,
            "EDGEOTA_SERVER_ENGINE_TICK_SECONDS": "0.2",
            "EDGEOTA_SERVER_ENGINE_LEASE_SECONDS": "2",
        }
        self.log = tmp_path / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, headers=AUTH, timeout=10)

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [EDGEOTA, "server", "run", "--port", str(self.port), *self.worker_args()],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if self.http.get("/healthz").json().get("mqtt_connected"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server did not become ready:\n" + self.log.read_text()[-3000:])

    def worker_args(self) -> list[str]:
        return ["--workers", str(self.workers)] if self.workers else []

    @contextmanager
    def running(self) -> Iterator[ServerProcess]:
        """Start the server; on exit disconnect the tests' simulated devices, stop it, close the client."""
        self.start()
        try:
            yield self
        finally:
            for sim in self.sims:
                sim.disconnect()
            self.stop()
            self.http.close()

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=5)

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.http.request(method, path, **kwargs)
        assert resp.status_code < 400, resp.text
        return resp.json()
