"""The agent's local inference endpoint: the Open Inference Protocol over HTTP/1.1, standard library only.

One :class:`InferenceEndpoint` serves a Unix socket (default; file permissions decide who may call) and,
optionally, a loopback TCP port, each with a thread per connection (keep-alive) and one accept thread
that sleeps until a connection or :meth:`InferenceEndpoint.stop` arrives (no polling). Requests go
through ``predict_on(model, inputs)``, the same path as :meth:`device_agent.agent.Agent.predict`: hot
swap, telemetry, the trial window and shadow mode see them as any other request.

Guarantees: every answer to client input is a 2xx or a 4xx with the protocol's ``{"error": "..."}``
body; a 5xx only reports the agent's own failure (500: the model failed on valid input).
``POST /v2/models/{name}/feedback`` (the agent's ``edgeota_feedback`` extension) takes a true label or reward
for a prediction id it returned: 202 once spooled for the server, 404 for an unknown or expired id, 400 for a
bad body. Before the first install, model paths answer 404 and readiness 400. A body over ``max_body_bytes`` is refused with 413 before it is read. With a token set, a
request without ``Authorization: Bearer <token>`` gets 401.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from device_agent.serving import oip
from device_agent.serving.predictions import PREDICTION_ID, FeedbackError
from device_agent.serving.runtime import LoadedModel, ModelError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import new_id
from edgeota_contract.version import __version__

log = logging.getLogger("device_agent.serving")

Predict = Callable[[LoadedModel | None, dict[str, Any]], dict[str, Any]]
"""``predict_on(model, inputs) -> outputs``: raises ModelError (NoModelError when model is None)."""
Answered = Callable[[LoadedModel, dict[str, Any], str], None]
"""``on_answer(model, outputs, prediction_id)``: called for every answered inference (remembers it for feedback)."""
Feedback = Callable[[str, bytes], dict[str, Any]]
"""``feedback(model_name, body) -> answer``: raises FeedbackError (400/404) for bad or unknown feedback."""


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how the endpoint listens (from :class:`~device_agent.settings.AgentSettings`)."""

    socket_path: Path | None
    socket_mode: int = 0o660
    tcp_host: str = "127.0.0.1"
    tcp_port: int | None = None
    token: str | None = None
    max_body_bytes: int = 16 << 20


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    server_version = "edgeota-agent"
    sys_version = ""
    endpoint: InferenceEndpoint  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one log line per request would cost more than the request; errors are logged below

    def address_string(self) -> str:
        return str(self.client_address[0]) if self.client_address else "unix"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._consumed = False
        try:
            status, body, headers = self.endpoint.handle(method, self.path, self.headers, self._read_body)
        except oip.ProtocolError as exc:
            status, body, headers = exc.status, oip.error_body(str(exc)), {}
            if exc.allow:
                headers["Allow"] = exc.allow
        except Exception as exc:  # a bug must answer 500, never kill the connection thread silently
            log.exception("inference endpoint error")
            status, body, headers = 500, oip.error_body(f"internal error: {exc!r}"[:300]), {}
        if not self._consumed and (
            self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers
        ):
            self.close_connection = True  # an unread body is still on the wire: this connection cannot go on
        self.send_response(status)
        self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write (the base class buffers headers in ``_headers_buffer``): one wake-up of
        # the client per answer instead of two, ~10% of a small request's round trip.
        self._headers_buffer.append(b"\r\n" + (body if method != "HEAD" else b""))  # type: ignore[attr-defined]
        self.flush_headers()

    _consumed = False

    def _read_body(self, limit: int) -> bytes:
        raw = self.headers.get("Content-Length")
        if raw is None:
            if "Transfer-Encoding" in self.headers:
                raise oip.ProtocolError(411, "chunked bodies are not supported: send Content-Length")
            self._consumed = True
            return b""
        try:
            length = int(raw)
        except ValueError:
            raise oip.ProtocolError(400, "Content-Length is not an integer") from None
        if length < 0:
            raise oip.ProtocolError(400, "negative Content-Length")
        if length > limit:
            raise oip.ProtocolError(413, f"body of {length} bytes is over the limit of {limit} bytes")
        body = self.rfile.read(length)
        self._consumed = True
        if len(body) != length:
            self.close_connection = True
            raise oip.ProtocolError(400, f"body ended after {len(body)} of {length} bytes")
        return body


class _Connections:
    """Tracks open connections so that :meth:`InferenceEndpoint.stop` can end idle keep-alive ones."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open: set[socket.socket] = set()
        self.open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.open_lock:
            self.open.add(request)
        super().process_request(request, client_address)  # type: ignore[misc]

    def shutdown_request(self, request: Any) -> None:
        with self.open_lock:
            self.open.discard(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client gone mid-answer (broken pipe, reset) is its business; no traceback on stderr
        log.debug("inference endpoint connection error", exc_info=True)

    def end_reads(self) -> None:
        """Stop reading from every open connection: an answer in progress is still written, then the
        connection ends (its next read sees end of file)."""
        with self.open_lock:
            conns = list(self.open)
        for conn in conns:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RD)


class _UnixServer(_Connections, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    pass


class _TCPServer(_Connections, socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True


class InferenceEndpoint:
    """The Open Inference Protocol endpoint of one agent. Thread-safe; :meth:`start` once, :meth:`stop` once.

    ``current`` returns the serving model (or None); ``predict`` runs a request on the model it is given.
    """

    def __init__(
        self,
        config: EndpointConfig,
        current: Callable[[], LoadedModel | None],
        predict: Predict,
        *,
        on_answer: Answered | None = None,
        feedback: Feedback | None = None,
    ) -> None:
        self.config = config
        self._current = current
        self._predict = predict
        self._on_answer = on_answer
        self._feedback = feedback
        self._servers: list[_UnixServer | _TCPServer] = []
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self.tcp_address: tuple[str, int] | None = None
        """The bound TCP (host, port) once started with a port (0 picks a free one)."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind the socket (and port) and start serving.

        Raises:
            OSError: the socket or port cannot be bound (e.g. the port is taken, the socket path too long).
        """
        cfg = self.config
        try:
            if cfg.socket_path is not None:
                unix_handler = type("UnixHandler", (_Handler,), {"endpoint": self})
                self._servers.append(self._bind_unix(cfg.socket_path, unix_handler))
            if cfg.tcp_port is not None:
                # TCP_NODELAY: the answer's headers and body are two writes; with Nagle the second one waits
                # for the client's delayed ACK (~40 ms a request on Linux loopback)
                tcp_handler = type("TCPHandler", (_Handler,), {"endpoint": self, "disable_nagle_algorithm": True})
                tcp = _TCPServer((cfg.tcp_host, cfg.tcp_port), tcp_handler)
                self._servers.append(tcp)
                host, port = tcp.server_address[:2]
                self.tcp_address = (str(host), int(port))
        except BaseException:
            self._close_servers()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._accept, name="oip-accept", daemon=True)
        self._thread.start()
        log_event(
            log,
            "inference_endpoint_started",
            socket=str(cfg.socket_path) if cfg.socket_path else None,
            tcp=f"{self.tcp_address[0]}:{self.tcp_address[1]}" if self.tcp_address else None,
            token=cfg.token is not None,
        )

    def _bind_unix(self, path: Path, handler: type[_Handler]) -> _UnixServer:
        # Bind under a temporary name, set the mode, then rename: the final path never exists with the
        # wrong permissions (the process umask is process-wide, so it cannot be changed for this alone).
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # a socket left by a killed agent (we hold the state folder's lock)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        server = _UnixServer(str(tmp), handler)
        try:
            os.chmod(tmp, self.config.socket_mode)
            os.replace(tmp, path)
        except BaseException:
            server.server_close()
            tmp.unlink(missing_ok=True)
            raise
        return server

    def _accept(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        for server in self._servers:
            sel.register(server.fileno(), selectors.EVENT_READ, server)
        try:
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    key.data.handle_request()  # readable: accepts at once, a thread per connection
        finally:
            sel.close()

    def stop(self) -> None:
        """Stop accepting, close the listening sockets and remove the socket file. Open connections end
        after the answer in progress, if any. Idempotent."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5.0)
            self._thread = None
            os.close(self._wake_r)
            os.close(self._wake_w)
        for server in self._servers:
            server.end_reads()
        self._close_servers()

    def _close_servers(self) -> None:
        for server in self._servers:
            server.server_close()
        self._servers = []
        path = self.config.socket_path
        if path is not None and path.is_socket():
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ requests

    def handle(
        self, method: str, path: str, headers: Any, read_body: Callable[[int], bytes]
    ) -> tuple[int, bytes, dict[str, str]]:
        """Answer one request: (status, body, extra headers). Raises ProtocolError for a 4xx answer."""
        self._authorize(headers.get("Authorization"))
        r = oip.route(method, path)
        body = read_body(self.config.max_body_bytes) if r.endpoint in ("infer", "feedback") else b""
        if r.endpoint == "server":
            return _json(200, {"name": "edgeota-agent", "version": __version__, "extensions": list(oip.EXTENSIONS)})
        if r.endpoint == "live":
            return _json(200, {"live": True})
        if r.endpoint == "feedback":
            return self._take_feedback(r, body)
        model = self._current()
        if r.endpoint == "ready":
            if model is None:
                raise oip.ProtocolError(400, "not ready: no model is being served yet")
            return _json(200, {"ready": True})
        model = self._resolve(model, r)
        if r.endpoint == "model":
            return _json(200, oip.model_metadata(model.manifest))
        if r.endpoint == "model_ready":
            return _json(200, {"name": model.manifest.model_name, "ready": True})
        return self._infer(model, body, headers.get(oip.HEADER_LENGTH))

    def _authorize(self, header: str | None) -> None:
        token = self.config.token
        if token is None:
            return
        scheme, _, given = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise oip.ProtocolError(401, "missing or wrong bearer token")

    def _resolve(self, model: LoadedModel | None, r: oip.Route) -> LoadedModel:
        if model is None or model.manifest.model_name != r.model:
            raise oip.ProtocolError(404, f"unknown model: {r.model}")
        if r.version is not None and r.version != model.manifest.version:
            raise oip.ProtocolError(404, f"model {r.model} version {r.version} is not serving")
        return model

    def _take_feedback(self, r: oip.Route, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """202: the feedback is spooled for the server. The model in the path names the prediction's model (which
        may no longer serve); a version in the path is ignored (the prediction id names its release)."""
        if self._feedback is None:
            raise oip.ProtocolError(404, "this agent takes no feedback")
        assert r.model is not None
        try:
            return _json(202, self._feedback(r.model, body))
        except FeedbackError as exc:
            raise oip.ProtocolError(exc.status, str(exc)) from None

    def _infer(self, model: LoadedModel, body: bytes, header_length: str | None) -> tuple[int, bytes, dict[str, str]]:
        doc, binary = oip.parse_header(body, header_length)
        request = oip.decode_infer(doc, binary, model.manifest)
        # The request was checked against ``model``, which now serves it even if a swap happens meanwhile:
        # the answer names the release that really produced it.
        prediction_id = new_id()
        token = PREDICTION_ID.set(prediction_id)  # the sampler tags kept inputs with it (dataset labels)
        try:
            outputs = self._predict(model, request.inputs)
        except ModelError as exc:
            return 500, oip.error_body(f"inference failed: {exc}"), {}
        finally:
            PREDICTION_ID.reset(token)
        if self._on_answer is not None:
            self._on_answer(model, outputs, prediction_id)
        out, header_len = oip.encode_infer(
            request,
            outputs,
            model_name=model.manifest.model_name,
            model_version=model.manifest.version,
            bundle_sha256=model.bundle_sha256,
            prediction_id=prediction_id,
        )
        if header_len is None:
            return 200, out, {}
        return 200, out, {"Content-Type": "application/octet-stream", oip.HEADER_LENGTH: str(header_len)}


def _json(status: int, doc: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
    return status, json.dumps(doc, separators=(",", ":")).encode("utf-8"), {}


def socket_mode(text: str) -> int:
    """Parse a mode like ``0660`` or ``660``."""
    return int(text, 8)
