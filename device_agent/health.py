"""Whether the agent reaches its broker and its server, for the log and for ``edgeota agent status``.

:class:`ConnectionHealth` keeps the latest :class:`~device_agent.transport.status.LinkStatus` of the broker link
and the result of the latest server check, and writes both to ``<state_dir>/connection.json`` after every change
(with this process's id, so a reader can tell a running agent's file from one a killed agent left).
:class:`ServerCheck` asks the server's ``GET /healthz`` on a thread of its own: at start, then every
``server_check_seconds`` while it answers, and sooner (5 s, doubling) while it does not. Any HTTP answer counts as
reachable; a network error, a TLS failure or a timeout does not, and is logged with its reason
(``server_unreachable``, a warning, on every failed check).

:func:`read_health` and :func:`health_lines` are what the CLI uses; they never raise for a missing or damaged file.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent.transport.http import open_url
from device_agent.transport.status import LinkStatus
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event

log = logging.getLogger("device_agent.health")
HEALTH_FILE = "connection.json"
HEALTH_PATH = "/healthz"
CHECK_TIMEOUT_SECONDS = 5.0
FIRST_RETRY_SECONDS = 5.0


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ConnectionHealth:
    """The agent's view of its connections (thread-safe). Callbacks come from the network and check threads."""

    def __init__(self, state_dir: Path, device_id: str) -> None:
        self.path = state_dir / HEALTH_FILE
        self.device_id = device_id
        self._lock = threading.Lock()
        self._data: dict[str, Any] = {
            "pid": os.getpid(),
            "broker": {"state": "not started", "since": _now()},
            "server": {"state": "not checked", "since": _now()},
        }

    def broker(self, status: LinkStatus) -> None:
        """Record the broker link's new status (a :data:`~device_agent.transport.status.StatusCallback`)."""
        entry: dict[str, Any] = {"state": status.state, "reason": status.reason, "failures": status.failures}
        if status.duplicate:
            entry["duplicate"] = status.duplicate
        self._set("broker", entry)

    def server(self, reachable: bool, reason: str, failures: int) -> None:
        """Record the result of a server check."""
        self._set(
            "server", {"state": "reachable" if reachable else "unreachable", "reason": reason, "failures": failures}
        )

    def _set(self, part: str, entry: dict[str, Any]) -> None:
        with self._lock:
            old = self._data.get(part, {})
            same = {k: v for k, v in old.items() if k != "since"} == entry
            if same:
                return
            self._data[part] = {**entry, "since": _now() if old.get("state") != entry["state"] else old["since"]}
            text = json.dumps(self._data, indent=1)
        self._write(text)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            copy: dict[str, Any] = json.loads(json.dumps(self._data))  # a deep copy
        return copy

    def _write(self, text: str) -> None:
        # A status file only: replaced atomically, not fsynced (it is rewritten on the next change anyway).
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            log_event(log, "health_write_failed", level=logging.DEBUG, detail=str(exc))

    def close(self) -> None:
        """The agent stopped: remove the file (a status reader then reports no running agent)."""
        with self._lock:
            self.path.unlink(missing_ok=True)


class ServerCheck:
    """Checks on a daemon thread that the server answers HTTP at all; see the module docstring."""

    def __init__(
        self,
        server_url: str,
        period: float,
        health: ConnectionHealth,
        *,
        allow_insecure_http: bool = False,
        timeout: float = CHECK_TIMEOUT_SECONDS,
    ) -> None:
        self.url = server_url.rstrip("/") + HEALTH_PATH
        self.period = period
        self.health = health
        self.timeout = timeout
        self.failures = 0
        self._allow_insecure_http = allow_insecure_http
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"agent-{self.health.device_id}-check", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check_once()
            delay = (
                self.period if self.failures == 0 else min(self.period, FIRST_RETRY_SECONDS * 2 ** (self.failures - 1))
            )
            self._stop.wait(delay)

    def check_once(self) -> bool:
        """Ask the server now; True when it answered. Logs and records the result."""
        started = time.monotonic()
        try:
            # No token: /healthz is public, and the device token never travels for a check.
            with open_url(self.url, timeout=self.timeout, allow_insecure_http=self._allow_insecure_http) as resp:
                status = resp.status
        except (OSError, http.client.HTTPException, EdgeotaError) as exc:
            self.failures += 1
            reason = _reason(exc)
            log_event(
                log,
                "server_unreachable",
                level=logging.WARNING,
                device=self.health.device_id,
                url=self.url,
                reason=reason,
                attempt=self.failures,
                retry_in_s=min(self.period, FIRST_RETRY_SECONDS * 2 ** (self.failures - 1)),
            )
            self.health.server(False, f"cannot reach server {self.url}: {reason}", self.failures)
            return False
        if self.failures:
            log_event(log, "server_reachable", device=self.health.device_id, url=self.url, after=self.failures)
        self.failures = 0
        self.health.server(True, f"HTTP {status} in {time.monotonic() - started:.2f} s", 0)
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})" if exc.errno else exc.strerror
    return str(exc) or type(exc).__name__


def read_health(state_dir: Path) -> dict[str, Any] | None:
    """The connection status a running agent wrote, or None (no agent running, or a file it left when killed)."""
    try:
        data = json.loads((state_dir / HEALTH_FILE).read_text(encoding="utf-8"))
        pid = int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by another user (the agent's service account)
        pass
    return data if isinstance(data, dict) else None


def health_lines(data: dict[str, Any] | None) -> list[str]:
    """``agent status`` lines for the connections (one when no agent runs)."""
    if data is None:
        return ["connection:     - (no agent running on this state folder)"]
    lines = []
    for part in ("broker", "server"):
        entry = data.get(part) or {}
        state = str(entry.get("state", "?"))
        reason = str(entry.get("reason") or "")
        since = str(entry.get("since", ""))
        text = f"{part + ':':<16}{state} since {since}"
        if reason and state not in ("connected", "reachable"):
            text += f": {reason}"
        lines.append(text)
        if entry.get("duplicate"):
            lines.append(f"{'':<16}WARNING {entry['duplicate']}")
    return lines
