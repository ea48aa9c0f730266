"""Commands by HTTP polling: ``command_transport = "http_poll"``.

:class:`HttpCommandPoller` asks ``GET /api/v1/devices/{device_id}/commands`` (the device's own
token) once at start and then every ``command_poll_seconds`` (jittered by +-10% so a fleet's polls
drift apart), and hands every signed command document in the answer to the agent, byte for byte as
MQTT would carry it: the agent verifies each one as usual. The server answers with the signed
assignments of the device's open deployments (rollouts, shadow deployments and server-ordered
rollbacks alike), fresh at each poll; repeats are harmless (the agent dedupes by deployment and nonce).

:class:`PolledTransport` composes it with a report transport (MQTT), because the server takes reports,
and acknowledges them, only over MQTT: a pure-HTTP agent would need a server endpoint for reports, which
does not exist. Through that MQTT connection the agent still receives what polls do not serve: acks of
its reports, check-in requests and shadow stops. Assignments arriving over MQTT are dropped
(:data:`POLLED_KINDS`), so assignments come by polls only, whatever the server also publishes.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading

from device_agent.transport.base import CommandCallback, CommandSource, ConnectedCallback, Transport
from device_agent.transport.http import open_url
from device_agent.transport.status import ObservableTransport, StatusCallback
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.topics import Channel

log = logging.getLogger("device_agent.poll")
COMMANDS_PATH = "/api/v1/devices/{device_id}/commands"
POLLED_KINDS = frozenset({"assign"})
"""Command kinds a polling agent takes from polls only (the server's poll serves exactly these)."""
MAX_ANSWER_BYTES = 4 << 20
POLL_TIMEOUT_SECONDS = 30.0


class PollError(EdgeotaError):
    """A poll answer that is not ``200`` with ``{"commands": [object, ...]}`` (reason ``download_failed``)."""


def command_kind(payload: bytes) -> str | None:
    """The ``kind`` inside a signed command document, unverified (only used to route; the agent verifies
    what it acts on). None when the document cannot be read."""
    try:
        body = json.loads(json.loads(payload)["body"])
        kind = body.get("kind")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def fetch_commands(
    url: str, token: str, timeout: float = POLL_TIMEOUT_SECONDS, *, allow_insecure_http: bool = False
) -> list[bytes]:
    """One poll of ``url``: each signed command document in the answer, as a payload for the agent.

    Raises:
        PollError: an answer other than 200, or a body that is not ``{"commands": [object, ...]}``.
        FetchError: a refused redirect, or a body over :data:`MAX_ANSWER_BYTES`
            (:class:`~device_agent.transport.http.FetchError`).
        OSError, http.client.HTTPException: network faults.
    """
    headers = {"Accept": "application/json"}
    with open_url(url, token=token, headers=headers, timeout=timeout, allow_insecure_http=allow_insecure_http) as resp:
        if resp.status != 200:
            raise PollError(f"HTTP {resp.status} {resp.reason} for {resp.url}")
        body = resp.read_limited(MAX_ANSWER_BYTES)
    try:
        commands = json.loads(body)["commands"]
        if not isinstance(commands, list) or not all(isinstance(c, dict) for c in commands):
            raise TypeError("commands is not a list of objects")
    except (ValueError, KeyError, TypeError) as exc:
        raise PollError(f"unreadable poll answer from {url}: {exc}") from exc
    return [json.dumps(c).encode("utf-8") for c in commands]


def poll_url(server_url: str, device_id: str) -> str:
    return server_url.rstrip("/") + COMMANDS_PATH.format(device_id=device_id)


class HttpCommandPoller:
    """A :class:`~device_agent.transport.base.CommandSource` polling one device's commands on a thread of its own.

    A failed poll (network fault, refusal, unreadable answer) is logged and counted in :attr:`failed`;
    the next one comes one period later. :meth:`stop` ends the thread: no command is delivered after it.
    """

    def __init__(
        self,
        server_url: str,
        device_id: str,
        token: str,
        period: float,
        *,
        timeout: float = POLL_TIMEOUT_SECONDS,
        rng: random.Random | None = None,
        allow_insecure_http: bool = False,
    ) -> None:
        """Raises ValueError for a period that is not positive."""
        if period <= 0:
            raise ValueError("the poll period must be positive")
        self.url = poll_url(server_url, device_id)
        self.device_id = device_id
        self.period = period
        self.timeout = timeout
        self.polls = 0
        self.failed = 0
        self.delivered = 0
        self._token = token
        self._allow_insecure_http = allow_insecure_http
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, on_command: CommandCallback) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, args=(on_command,), name=f"agent-{self.device_id}-poll", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self, on_command: CommandCallback) -> None:
        while not self._stop.is_set():
            for payload in self.poll_once():
                if self._stop.is_set():
                    return
                try:
                    on_command(payload)
                except Exception:  # a bug in the handler must not end polling
                    log.exception("command handler failed")
            self._stop.wait(self.period * self._rng.uniform(0.9, 1.1))

    def poll_once(self) -> list[bytes]:
        """Poll now; the commands served (none after a failed poll, which is logged and counted)."""
        self.polls += 1
        try:
            payloads = fetch_commands(
                self.url, self._token, self.timeout, allow_insecure_http=self._allow_insecure_http
            )
        except (OSError, http.client.HTTPException, EdgeotaError) as exc:
            self.failed += 1
            log_event(log, "command_poll_failed", level=logging.WARNING, device=self.device_id, detail=str(exc)[:200])
            return []
        self.delivered += len(payloads)
        return payloads


class PolledTransport:
    """A :class:`~device_agent.transport.base.Transport`: commands from ``commands``, reports through ``reports``.

    ``reports`` (an MQTT link) also delivers commands, except :data:`POLLED_KINDS`, which only
    ``commands`` delivers; the dropped ones are counted in :attr:`dropped`. Presence, :attr:`connected`
    and ``on_connected`` are those of ``reports``.
    """

    def __init__(self, commands: CommandSource, reports: Transport) -> None:
        self.commands = commands
        self.reports = reports
        self.dropped = 0

    def start(self, on_command: CommandCallback, on_connected: ConnectedCallback) -> None:
        def from_reports(payload: bytes) -> None:
            if command_kind(payload) in POLLED_KINDS:
                self.dropped += 1
                return
            on_command(payload)

        self.reports.start(from_reports, on_connected)
        self.commands.start(on_command)

    def stop(self, timeout: float = 5.0) -> None:
        self.commands.stop(timeout)
        self.reports.stop(timeout)

    def abort(self) -> None:
        self.commands.stop()
        self.reports.abort()

    @property
    def connected(self) -> bool:
        return self.reports.connected

    def wait_connected(self, timeout: float) -> bool:
        return self.reports.wait_connected(timeout)

    def send(self, channel: Channel, payload: bytes) -> bool:
        return self.reports.send(channel, payload)

    def observe(self, callback: StatusCallback) -> None:
        """The status of ``reports`` (the broker link), when it reports one."""
        if isinstance(self.reports, ObservableTransport):
            self.reports.observe(callback)
