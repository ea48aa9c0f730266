"""The simulator's HTTP command poller against a real HTTP server, and the MQTT command filter for polling devices."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from edgeota.fleet.agents import MQTT_KINDS_WHEN_POLLING, command_kind
from edgeota.fleet.poll import CommandPoller, PollTarget

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


def test_poller_delivers_each_devices_commands_and_skips_offline_devices(command_server: str) -> None:
    got: dict[str, list[dict[str, Any]]] = {"d-0": [], "d-1": [], "d-2": []}
    targets = [
        PollTarget("d-0", command_server, TOKENS["d-0"], got["d-0"].append, lambda: True),
        PollTarget("d-1", command_server, "wrong-token-0123456789", got["d-1"].append, lambda: True),
        PollTarget("d-2", command_server, TOKENS["d-2"], got["d-2"].append, lambda: False),  # offline
    ]
    poller = CommandPoller(targets, period=0.2, seed=1, threads=2)
    poller.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(got["d-0"]) < 3 or poller.failed < 3):
            time.sleep(0.05)
    finally:
        poller.stop()
    assert len(got["d-0"]) >= 3
    assert got["d-0"][0]["sig"] == {"for": "d-0"}  # the document as served, untouched
    assert got["d-1"] == [] and poller.failed >= 3  # refused polls deliver nothing and are counted
    assert got["d-2"] == [] and "d-2" not in _Handler.hits  # an offline device does not poll
    assert poller.delivered == len(got["d-0"])


def test_poller_rejects_a_period_that_is_not_positive() -> None:
    with pytest.raises(ValueError):
        CommandPoller([], period=0)


def test_command_kind_reads_the_signed_body_and_polling_devices_keep_only_acks_from_mqtt() -> None:
    def doc(kind: str) -> bytes:
        return json.dumps({"body": json.dumps({"kind": kind}), "sig": {}}).encode()

    assert command_kind(doc("assign")) == "assign"
    assert command_kind(doc("ack")) in MQTT_KINDS_WHEN_POLLING
    assert command_kind(doc("checkin_request")) in MQTT_KINDS_WHEN_POLLING
    assert command_kind(doc("assign")) not in MQTT_KINDS_WHEN_POLLING
    assert command_kind(doc("shadow_stop")) not in MQTT_KINDS_WHEN_POLLING
    assert command_kind(b"not json") is None
    assert command_kind(b'{"body": "[1]"}') is None
