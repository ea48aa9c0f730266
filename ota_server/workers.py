"""``edgeota server run --workers N``: N API processes plus one core process.

The parent process is the *core*: it migrates the database once, binds the listening socket,
starts N API worker processes (``spawn``, each its own interpreter and GIL) that share that
socket, and then runs the rollout engine loop and the MQTT bridge itself, so both run in
exactly one process whatever N is. It serves no HTTP.

API workers have neither engine nor bridge. A command they cause (a manual rollback, a
``shadow_stop``) is committed to the database first, as always, and its signed payload is handed
to the core through a queue, which publishes it; if that hand-over is lost, the core's engine
tick re-sends pending deployments and the device's next check-in re-sends every open one.
``/healthz`` in a worker reports the core bridge's connection through a shared flag, and
``/api/v1/metrics`` adds the core's counters (ingest, engine; refreshed every second) to the worker's own.

Guarantees: the core restarts a worker that dies (at most ``MAX_RESTARTS`` times, then it shuts
down with an error); SIGTERM/SIGINT stop the workers (graceful, then killed after
``STOP_TIMEOUT`` seconds), the engine loop and the bridge, and the process then exits by the same
signal, like the single-process server.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.context import SpawnProcess
from typing import TYPE_CHECKING, Any

from edgeota_contract.errors import ContractError
from edgeota_contract.logs import configure_logging, log_event
from edgeota_contract.states import ReasonCode
from ota_server.core.config import Settings

log = logging.getLogger("edgeota.server.workers")
MAX_RESTARTS = 10
STOP_TIMEOUT = 10.0
if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.sharedctypes import Synchronized

    CommandQueue = Queue[tuple[str, bytes]]


class _SharedFlag:
    """``threading.Event``-like view of a shared byte (what ``/healthz`` reads as ``connected``)."""

    def __init__(self, value: Synchronized[int]) -> None:
        self._value = value

    def is_set(self) -> bool:
        return bool(self._value.value)


class QueuePublisher:
    """A worker's publisher: hands signed commands to the core process, which owns the MQTT bridge."""

    def __init__(self, commands: CommandQueue, connected: Synchronized[int]) -> None:
        self.commands = commands
        self.connected = _SharedFlag(connected)

    def publish_command(self, device_id: str, payload: bytes) -> bool:
        """True when the core took the command and its bridge is connected (as a direct publish would say)."""
        try:
            self.commands.put_nowait((device_id, payload))
        except queue.Full:
            log_event(log, "command_queue_full", logging.WARNING, device=device_id)
            return False
        return self.connected.is_set()


class SharedMetrics:
    """The core's counters as JSON in a shared buffer: the core writes them, the workers read them."""

    SIZE = 1 << 16

    def __init__(self, buffer: Any) -> None:
        self.buffer = buffer

    def write(self, counts: dict[str, int]) -> None:
        data = json.dumps(counts, separators=(",", ":")).encode()
        if len(data) < self.SIZE:  # a snapshot that does not fit is skipped, never truncated
            with self.buffer.get_lock():
                self.buffer.value = data

    def read(self) -> dict[str, int]:
        with self.buffer.get_lock():
            data = self.buffer.value
        try:
            loaded = json.loads(data) if data else {}
        except ValueError:
            return {}
        return {str(k): int(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ContractError(f"cannot listen on {host}:{port}: {exc}", ReasonCode.INTERNAL_ERROR) from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _api_worker(
    data: dict[str, Any], sock: socket.socket, commands: CommandQueue, connected: Any, core_metrics: Any
) -> None:
    """Entry point of one API worker process (spawned): the HTTP app without engine or bridge."""
    import uvicorn

    from ota_server.main import build_context, create_app

    settings = Settings(**{**data, "engine_enabled": False, "mqtt_enabled": False})
    configure_logging(settings.log_level)
    ctx = build_context(settings, migrate=False)
    ctx.publisher = QueuePublisher(commands, connected)
    ctx.core_metrics = SharedMetrics(core_metrics).read
    config = uvicorn.Config(
        create_app(settings, ctx), log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on"
    )
    uvicorn.Server(config).run(sockets=[sock])


def run_workers(settings: Settings, host: str, port: int, workers: int) -> None:
    """Run the core (engine + MQTT bridge) here and ``workers`` API processes on ``host:port``.

    Returns only through the re-raised stop signal (or an error). Raises ContractError when the
    address cannot be bound, the configuration is invalid, or workers keep dying.
    """
    from ota_server.main import build_context, start_core

    ctx = build_context(settings)  # migrations and the server key, once, before any worker starts
    sock = _bind(host, port)
    mp = multiprocessing.get_context("spawn")
    # Queue, connection flag and metrics buffer shared with the workers (kept in one dict so they can be dropped).
    shared: dict[str, Any] = {
        "commands": mp.Queue(maxsize=100_000),
        "connected": mp.Value("b", 0),
        "core_metrics": mp.Array("c", SharedMetrics.SIZE),
    }
    data = settings.model_dump()
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def spawn(index: int) -> SpawnProcess:
        proc = mp.Process(
            target=_api_worker,
            args=(data, sock, shared["commands"], shared["connected"], shared["core_metrics"]),
            name=f"edgeota-api-{index}",
            daemon=False,
        )
        proc.start()
        return proc

    procs = [spawn(i) for i in range(workers)]
    stop_core: Callable[[], None] | None = None
    forwarder = threading.Thread(
        target=_forward,
        args=(ctx, shared["commands"], shared["connected"], SharedMetrics(shared["core_metrics"]), stop),
        name="command-forwarder",
    )
    try:
        stop_core = start_core(ctx, settings)
        forwarder.start()
        log_event(log, "server_started", public_url=settings.public_url, workers=workers, host=host, port=port)
        restarts = 0
        while not stop.wait(0.5):
            for i, proc in enumerate(procs):
                if proc.is_alive():
                    continue
                restarts += 1
                log_event(log, "api_worker_died", logging.ERROR, worker=i, exitcode=proc.exitcode, restarts=restarts)
                if restarts > MAX_RESTARTS:
                    raise ContractError("API workers keep dying; see the log", ReasonCode.INTERNAL_ERROR)
                procs[i] = spawn(i)
    finally:
        stop.set()
        _stop_all(procs)
        if forwarder.is_alive():
            forwarder.join(timeout=5)
        if stop_core is not None:
            stop_core()
        ctx.engine.dispose()
        sock.close()
        shared["commands"].close()
        shared["commands"].cancel_join_thread()
        log_event(log, "server_stopped")
    # Drop the shared queue, flag and buffer now: their finalizers unlink the semaphores, which
    # exiting by a signal would otherwise leave to the resource tracker (with a warning).
    procs.clear()
    shared.clear()
    gc.collect()
    if received:  # exit by the signal, as uvicorn does in the single-process server
        signal.signal(received[0], signal.SIG_DFL)
        os.kill(os.getpid(), received[0])


def _forward(ctx: Any, commands: CommandQueue, connected: Any, metrics: SharedMetrics, stop: threading.Event) -> None:
    """Publish what the workers hand over; mirror the bridge's connection and the core's counters for them."""
    bridge_flag = getattr(ctx.publisher, "connected", None)
    shared_at = 0.0
    while not stop.is_set():
        connected.value = int(bool(bridge_flag is not None and bridge_flag.is_set()))
        if time.monotonic() - shared_at >= 1.0:
            metrics.write(ctx.metrics.snapshot())
            shared_at = time.monotonic()
        try:
            device_id, payload = commands.get(timeout=0.2)
        except queue.Empty:
            continue
        try:
            if ctx.publisher.publish_command(device_id, payload):
                ctx.metrics.inc("commands_forwarded")
        except Exception as exc:  # a publish error must not end the forwarder
            log_event(log, "command_forward_failed", logging.ERROR, device=device_id, error=repr(exc))


def _stop_all(procs: list[SpawnProcess]) -> None:
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGTERM)
    for proc in procs:
        proc.join(timeout=STOP_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
