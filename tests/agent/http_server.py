"""A small threaded HTTP server for bundles, with Range support and fault modes (tests only).

Modes per path: ``ok``; ``endless`` (keeps sending bytes past the end, no Content-Length);
``trickle`` (one byte every ``trickle_delay`` seconds); ``drop`` (closes the connection after
``drop_after`` bytes, once per path, then serves normally); ``chunked`` (4 KiB pieces with short
pauses); ``stall`` (half the body, then ``trickle_delay`` seconds of silence); ``lie_range`` (answers a resume once with a Content-Range for another offset). ``redirect(path, location, status)`` answers a path with a
redirect (an empty location: none). Records every request's headers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up mid-response (the faults under test) are expected


@dataclass
class Served:
    data: bytes
    mode: str = "ok"
    drop_after: int = 0
    drops_left: int = 1
    trickle_delay: float = 0.2


@dataclass
class BundleServer:
    token: str | None = None
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[tuple[str, bytes]] = field(default_factory=list)
    redirects: dict[str, tuple[int, str]] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, path: str, data: bytes, **kwargs: Any) -> str:
        self.files[path] = Served(data, **kwargs)
        return path

    def redirect(self, path: str, location: str, status: int = 302) -> str:
        self.redirects[path] = (status, location)
        return path

    def start(self) -> BundleServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # sample uploads
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
                    self.send_error(401)
                    return
                owner.uploads.append((self.path, body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                owner.requests.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                served = owner.files.get(self.path)
                if owner.token and self.headers.get("Authorization") != f"Bearer {owner.token}":
                    self.send_error(401)
                    return
                if self.path in owner.redirects:
                    status, location = owner.redirects[self.path]
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if served is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                data = served.data
                if start >= len(data) and served.mode != "endless":
                    self.send_response(416)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if served.mode == "endless":
                    self.send_header("Connection", "close")
                    self.end_headers()
                    try:
                        self.wfile.write(data[start:])
                        for _ in range(10_000):
                            self.wfile.write(b"\0" * 65536)
                    except OSError:
                        pass
                    return
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                if start and served.mode == "lie_range":  # claims (and sends) the wrong range, once
                    served.mode = "ok"
                    self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(data)}")
                elif start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                try:
                    if served.mode == "trickle":
                        for i in range(len(body)):
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            time.sleep(served.trickle_delay)
                    elif served.mode == "stall":  # half the body, then silence
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        time.sleep(served.trickle_delay)
                    elif served.mode == "chunked":  # small pieces, so a client sees several reads
                        for i in range(0, len(body), 4096):
                            self.wfile.write(body[i : i + 4096])
                            self.wfile.flush()
                            time.sleep(0.002)
                    elif served.mode == "drop" and served.drops_left > 0:
                        served.drops_left -= 1
                        self.wfile.write(body[: served.drop_after])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
