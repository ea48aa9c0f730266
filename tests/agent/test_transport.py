"""Each transport against the agent's ``Transport`` / ``CommandSource`` protocols.

The MQTT link against real Mosquitto; the HTTP poller against a real HTTP server (tokens, redirects,
refusals, unreadable answers); the polled composition over a recording report transport (a fake, in
this unit test only) to pin down which commands it takes from where.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from device_agent.transport.base import CommandSource, Transport
from device_agent.transport.mqtt import MqttLink
from device_agent.transport.poll import (
    MAX_ANSWER_BYTES,
    HttpCommandPoller,
    PolledTransport,
    PollError,
    fetch_commands,
    poll_url,
)
from edgeota_contract.provisioning import MqttSection
from edgeota_contract.topics import Channel
from tests.agent.mqtt_helpers import Recorder
from tests.conftest import Broker

TOKEN = "device-token-0123456789abcdef"


def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _doc(kind: str, n: int = 0) -> dict[str, Any]:
    return {"body": json.dumps({"kind": kind, "n": n}), "sig": {"key_id": "k", "sig": "s"}}


# ---------------------------------------------------------------- a real command server


class CommandServer:
    """Serves ``GET /api/v1/devices/{id}/commands``; per device: an answer (status, body) and the hits seen."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.hits: list[tuple[str, str | None]] = []  # (path, Authorization)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits.append((self.path, self.headers.get("Authorization")))
                status, body, headers = owner.answers.get(self.path, (404, b"", {}))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def serve(self, device_id: str, status: int, body: bytes, **headers: str) -> str:
        path = poll_url("", device_id)
        self.answers[path] = (status, body, headers)
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def commands() -> Iterator[CommandServer]:
    srv = CommandServer()
    yield srv
    srv.close()


# ---------------------------------------------------------------- protocol conformance


def test_every_transport_satisfies_the_protocols(commands: CommandServer) -> None:
    link = MqttLink("dev-p", "boot", MqttSection())
    poller = HttpCommandPoller(commands.url, "dev-p", TOKEN, 1.0)
    assert isinstance(link, Transport)
    assert isinstance(poller, CommandSource)
    assert isinstance(PolledTransport(poller, link), Transport)
    assert not isinstance(poller, Transport)  # a command source alone cannot carry reports


# ---------------------------------------------------------------- MQTT


@pytest.mark.integration
def test_mqtt_link_delivers_raw_commands_sends_reports_and_says_goodbye(mqtt_broker: Broker) -> None:
    device_id = f"tr-{uuid.uuid4().hex[:8]}"
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    got: list[bytes] = []
    connects: list[int] = []
    link: Transport = MqttLink(device_id, "boot-1", MqttSection(host=mqtt_broker.host, port=mqtt_broker.port))
    try:
        assert not link.connected and not link.send(Channel.STATUS, b"{}")  # not started: nothing handed over
        link.start(got.append, lambda: connects.append(1))
        assert link.wait_connected(15) and _until(lambda: connects == [1])
        payload = b'{"body": "not even verified here", "sig": {}}'
        rec.publish_cmd(payload)
        assert _until(lambda: got == [payload])  # byte for byte: verification is the agent's
        assert link.send(Channel.STATUS, b'{"n": 1}')
        assert rec.wait_for(lambda: rec.of("status") == [{"n": 1}])
        assert rec.wait_for(lambda: {"online": True}.items() <= rec.of("presence")[-1].items())
        link.stop()
        assert rec.wait_for(lambda: rec.of("presence")[-1].get("online") is False)
        assert not link.connected and not link.send(Channel.STATUS, b'{"n": 2}')
        link.stop()  # idempotent
    finally:
        link.abort()
        rec.close()


@pytest.mark.integration
def test_mqtt_link_abort_leaves_the_last_will_to_the_broker(mqtt_broker: Broker) -> None:
    device_id = f"tr-{uuid.uuid4().hex[:8]}"
    rec = Recorder(mqtt_broker.host, mqtt_broker.port, device_id)
    link = MqttLink(device_id, "boot-2", MqttSection(host=mqtt_broker.host, port=mqtt_broker.port, keepalive=5))
    try:
        link.start(lambda payload: None, lambda: None)
        assert link.wait_connected(15)
        assert rec.wait_for(lambda: any(p.get("online") for p in rec.of("presence")))
        link.abort()
        assert not link.connected
        # No goodbye was sent: the offline presence that arrives is the broker's last will.
        assert rec.wait_for(lambda: rec.of("presence")[-1] == {"online": False, "boot_id": "boot-2"}, timeout=30)
    finally:
        link.abort()
        rec.close()


# ---------------------------------------------------------------- HTTP polling


def test_poller_fetches_at_start_with_the_token_and_delivers_documents_unchanged(commands: CommandServer) -> None:
    docs = [_doc("assign", 1), _doc("assign", 2)]
    path = commands.serve("dev-1", 200, json.dumps({"commands": docs}).encode())
    got: list[bytes] = []
    poller = HttpCommandPoller(commands.url, "dev-1", TOKEN, period=0.1)
    poller.start(got.append)
    try:
        assert _until(lambda: len(got) >= 4)  # at start, then every period
    finally:
        poller.stop()
    assert [json.loads(p) for p in got[:2]] == docs
    assert commands.hits[0] == (path, f"Bearer {TOKEN}")
    assert poller.failed == 0 and poller.delivered >= 4
    polls = len(commands.hits)
    time.sleep(0.3)
    assert len(commands.hits) == polls  # stopped: no more polls


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (403, b'{"detail": "forbidden"}', "HTTP 403"),
        (200, b"<html>", "unreadable"),
        (200, b'{"items": []}', "unreadable"),
        (200, b'{"commands": ["a string"]}', "unreadable"),
    ],
    ids=["refused", "not-json", "no-commands", "not-objects"],
)
def test_a_bad_poll_answer_delivers_nothing_and_is_counted(
    commands: CommandServer, status: int, body: bytes, needle: str
) -> None:
    commands.serve("dev-1", status, body)
    with pytest.raises(PollError, match=needle):
        fetch_commands(poll_url(commands.url, "dev-1"), TOKEN)
    poller = HttpCommandPoller(commands.url, "dev-1", TOKEN, period=60)
    assert poller.poll_once() == []
    assert (poller.polls, poller.failed, poller.delivered) == (1, 1, 0)


def test_an_oversized_poll_answer_is_refused(commands: CommandServer) -> None:
    from device_agent.transport.http import FetchError

    commands.serve("dev-1", 200, b"x" * (MAX_ANSWER_BYTES + 1))
    with pytest.raises(FetchError, match="exceeds"):
        fetch_commands(poll_url(commands.url, "dev-1"), TOKEN)


def test_an_unreachable_server_is_a_failed_poll_not_a_crash() -> None:
    from tests.conftest import free_port

    poller = HttpCommandPoller(f"http://127.0.0.1:{free_port()}", "dev-1", TOKEN, period=60, timeout=2)
    assert poller.poll_once() == [] and poller.failed == 1


def test_a_redirected_poll_keeps_the_token_on_the_servers_origin_only(commands: CommandServer) -> None:
    other = CommandServer()
    try:
        other.serve("dev-1", 200, json.dumps({"commands": [_doc("assign")]}).encode())
        commands.serve("dev-1", 307, b"", Location=poll_url(other.url, "dev-1"))
        assert len(fetch_commands(poll_url(commands.url, "dev-1"), TOKEN)) == 1
        assert commands.hits[0][1] == f"Bearer {TOKEN}"
        assert other.hits[0][1] is None  # another origin never sees the device token
    finally:
        other.close()


def test_poller_rejects_a_period_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        HttpCommandPoller("http://127.0.0.1:1", "dev-1", TOKEN, period=0)


# ---------------------------------------------------------------- the polled composition


class RecordingReports:
    """A report transport that records what happens to it (unit-test fake of the MQTT link)."""

    def __init__(self) -> None:
        self.on_command: Callable[[bytes], None] | None = None
        self.on_connected: Callable[[], None] | None = None
        self.sent: list[tuple[Channel, bytes]] = []
        self.calls: list[str] = []
        self.is_connected = False

    def start(self, on_command: Callable[[bytes], None], on_connected: Callable[[], None]) -> None:
        self.calls.append("start")
        self.on_command, self.on_connected = on_command, on_connected

    def stop(self, timeout: float = 5.0) -> None:
        self.calls.append("stop")

    def abort(self) -> None:
        self.calls.append("abort")

    @property
    def connected(self) -> bool:
        return self.is_connected

    def wait_connected(self, timeout: float) -> bool:
        return self.is_connected

    def send(self, channel: Channel, payload: bytes) -> bool:
        self.sent.append((channel, payload))
        return self.is_connected


class RecordingSource:
    def __init__(self) -> None:
        self.on_command: Callable[[bytes], None] | None = None
        self.calls: list[str] = []

    def start(self, on_command: Callable[[bytes], None]) -> None:
        self.calls.append("start")
        self.on_command = on_command

    def stop(self, timeout: float = 5.0) -> None:
        self.calls.append("stop")


def test_polled_transport_takes_assignments_from_polls_only_and_the_rest_from_its_report_transport() -> None:
    reports, source = RecordingReports(), RecordingSource()
    transport = PolledTransport(source, reports)
    assert isinstance(transport, Transport)
    got: list[bytes] = []
    connected: list[int] = []
    transport.start(got.append, lambda: connected.append(1))
    assert reports.on_command is not None and reports.on_connected is not None and source.on_command is not None
    encoded = {kind: json.dumps(_doc(kind)).encode() for kind in ("assign", "ack", "checkin_request", "shadow_stop")}
    for payload in encoded.values():
        reports.on_command(payload)
    reports.on_command(b"garbage")  # unreadable: passed on, for the agent to reject and count
    assert got == [encoded["ack"], encoded["checkin_request"], encoded["shadow_stop"], b"garbage"]
    assert transport.dropped == 1
    source.on_command(encoded["assign"])
    assert got[-1] == encoded["assign"]
    reports.on_connected()
    assert connected == [1]

    assert not transport.connected and not transport.send(Channel.STATUS, b"s")
    reports.is_connected = True
    assert transport.connected and transport.wait_connected(0) and transport.send(Channel.TELEMETRY, b"t")
    assert reports.sent == [(Channel.STATUS, b"s"), (Channel.TELEMETRY, b"t")]

    transport.stop()
    assert source.calls == ["start", "stop"] and reports.calls == ["start", "stop"]
    transport.abort()
    assert source.calls[-1] == "stop" and reports.calls[-1] == "abort"
