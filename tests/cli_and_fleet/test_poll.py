"""The simulator's shared HTTP command poller, plugged into agents as a ``CommandSource`` (the agent's transport
seam), against a real HTTP server; and which command kinds a polling agent still takes from MQTT."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from device_agent.transport.base import CommandSource
from device_agent.transport.poll import POLLED_KINDS, command_kind
from edgeota.fleet.poll import SharedCommandPoller

TOKENS = {"d-0": "token-d0-0123456789abcdef", "d-1": "token-d1-0123456789abcdef", "d-2": "token-d2-0123456789abc"}


class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}

    def do_GET(self) -> None:
        parts = self.path.split("/")  # /api/v1/devices/{id}/commands
        device_id = parts[4] if len(parts) == 6 and parts[5] == "commands" else ""
        if self.headers.get("Authorization") != f"Bearer {TOKENS.get(device_id)}":
            self.send_response(403)
            self.end_headers()
            return
        _Handler.hits[device_id] = _Handler.hits.get(device_id, 0) + 1
        body = json.dumps({"commands": [{"body": json.dumps({"kind": "assign", "n": 1}), "sig": {"for": device_id}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def command_server() -> Iterator[str]:
    _Handler.hits = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.05)


def test_poller_delivers_each_devices_commands_and_skips_offline_devices(command_server: str) -> None:
    got: dict[str, list[bytes]] = {"d-0": [], "d-1": [], "d-2": []}
    poller = SharedCommandPoller(period=0.2, seed=1, threads=2)
    sources: list[CommandSource] = [
        poller.source(command_server, "d-0", TOKENS["d-0"]),
        poller.source(command_server, "d-1", "wrong-token-0123456789"),
        poller.source(command_server, "d-2", TOKENS["d-2"]),  # never started: an offline device
    ]
    sources[0].start(got["d-0"].append)
    sources[1].start(got["d-1"].append)
    poller.start()
    try:
        _wait(lambda: len(got["d-0"]) >= 3 and poller.failed >= 3)
    finally:
        poller.stop()
    assert len(got["d-0"]) >= 3
    assert json.loads(got["d-0"][0])["sig"] == {"for": "d-0"}  # the document as served, untouched
    assert got["d-1"] == [] and poller.failed >= 3  # refused polls deliver nothing and are counted
    assert got["d-2"] == [] and "d-2" not in _Handler.hits  # an offline device does not poll
    assert poller.delivered == len(got["d-0"])


def test_a_stopped_source_stops_polling_and_a_restarted_one_polls_again(command_server: str) -> None:
    got: list[bytes] = []
    poller = SharedCommandPoller(period=0.1, seed=2, threads=1)
    source = poller.source(command_server, "d-0", TOKENS["d-0"])
    poller.start()
    try:
        source.start(got.append)
        _wait(lambda: _Handler.hits.get("d-0", 0) >= 2)
        source.stop()
        time.sleep(0.3)  # a poll under way when stop() ran may still finish
        stopped_at = _Handler.hits["d-0"]
        time.sleep(0.5)
        assert _Handler.hits["d-0"] == stopped_at
        source.start(got.append)  # the agent restarted (a new boot on the same folder)
        _wait(lambda: _Handler.hits["d-0"] > stopped_at)
        assert _Handler.hits["d-0"] > stopped_at
    finally:
        poller.stop()


def test_poller_rejects_a_period_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        SharedCommandPoller(period=0)


def test_command_kind_reads_the_signed_body_and_polling_agents_take_only_assignments_from_polls() -> None:
    def doc(kind: str) -> bytes:
        return json.dumps({"body": json.dumps({"kind": kind}), "sig": {}}).encode()

    assert command_kind(doc("assign")) == "assign" and "assign" in POLLED_KINDS
    # what the server's poll does not serve keeps coming over MQTT
    for kind in ("ack", "checkin_request", "shadow_stop"):
        assert command_kind(doc(kind)) == kind and kind not in POLLED_KINDS
    assert command_kind(b"not json") is None
    assert command_kind(b'{"body": "[1]"}') is None
