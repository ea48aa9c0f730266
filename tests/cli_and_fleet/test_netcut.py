"""Cuttable proxies: traffic flows, a cut drops live connections and refuses new ones, restore recovers."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from edgeota.fleet.netcut import ProxyHub


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _echo_once(port: int, payload: bytes = b"ping") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(payload)
        return sock.recv(4096)


def test_cut_and_restore(echo_port: int) -> None:
    with ProxyHub() as hub:
        proxy = hub.proxy("127.0.0.1", echo_port)
        assert _echo_once(proxy.listen_port) == b"ping"

        live = socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=3)
        live.sendall(b"a")
        assert live.recv(10) == b"a"
        proxy.cut()
        with pytest.raises(OSError):  # the open connection is reset (or yields EOF, turned into an error here)
            live.sendall(b"b")
            if live.recv(10) == b"":
                raise ConnectionResetError("closed")
        live.close()
        with pytest.raises(OSError):
            if _echo_once(proxy.listen_port) == b"":
                raise ConnectionResetError("closed")

        proxy.restore()
        assert _echo_once(proxy.listen_port) == b"ping"
        assert proxy.connections_total == 3
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.listen_port), timeout=1)


def test_upstream_down_is_a_refused_connection() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = int(probe.getsockname()[1])
    with ProxyHub() as hub:
        proxy = hub.proxy("127.0.0.1", dead_port)
        with pytest.raises(OSError):
            if _echo_once(proxy.listen_port) == b"":
                raise ConnectionResetError("closed")
