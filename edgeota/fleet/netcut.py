"""TCP proxies that can be cut: a real network outage for one simulated device, whatever its agent does.

A device with a ``network_cut`` fault is provisioned with its MQTT broker (and server) address
pointing at a :class:`CuttableProxy` in front of the real one. :meth:`CuttableProxy.cut` closes
every open connection and refuses new ones until :meth:`CuttableProxy.restore`, exactly what a
device sees when its uplink drops: TCP resets, reconnect attempts failing, then recovery.

All proxies of a :class:`ProxyHub` share one asyncio loop on one background thread; ``close()``
stops the loop and joins the thread, leaving no socket open.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
HOST = "127.0.0.1"


@dataclass
class CuttableProxy:
    """Forwards ``listen_port`` to ``upstream``; :meth:`cut` and :meth:`restore` toggle the link."""

    hub: ProxyHub
    upstream_host: str
    upstream_port: int
    listen_port: int = 0
    connected: bool = True
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    connections_total: int = 0

    def cut(self) -> None:
        """Drop every open connection and refuse new ones (connections are closed right after accept)."""
        self.hub.call(self._cut())

    def restore(self) -> None:
        self.connected = True

    async def _cut(self) -> None:
        self.connected = False
        for writer in list(self._writers):
            _abort(writer)
        self._writers.clear()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.listen_port)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def _stop(self) -> None:
        await self._cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.connected:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            _abort(writer)
            return
        self.connections_total += 1
        self._writers.update((writer, up_writer))
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                _abort(w)


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    if not transport.is_closing():
        transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        _abort(writer)


class ProxyHub:
    """Runs any number of :class:`CuttableProxy` on one event loop thread. A context manager."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgeota-netcut", daemon=True)
        self._thread.start()
        self.proxies: list[CuttableProxy] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run ``coro`` on the hub's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def proxy(self, upstream_host: str, upstream_port: int) -> CuttableProxy:
        """A new proxy to ``upstream`` listening on a free local port (``.listen_port``)."""
        proxy = CuttableProxy(self, upstream_host, upstream_port)
        self.call(proxy._start())
        self.proxies.append(proxy)
        return proxy

    def close(self) -> None:
        """Stop every proxy, the loop and its thread (idempotent)."""
        if not self._thread.is_alive():
            return
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                self.call(proxy._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> ProxyHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
