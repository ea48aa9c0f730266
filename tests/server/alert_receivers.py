"""What the alert tests deliver to: a real HTTP webhook receiver that verifies the HMAC as docs/alerts.md
tells a receiver to, and a command that records its stdin and environment."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from ota_server.alerts import signing

RECORDER = """
import json, os, sys
body = sys.stdin.buffer.read()
env = {k: v for k, v in os.environ.items() if k.startswith("EDGEOTA_") or k in ("PATH", "MARK")}
manifest = None
if env.get("EDGEOTA_ALERT_EXPORT_MANIFEST"):
    with open(env["EDGEOTA_ALERT_EXPORT_MANIFEST"], encoding="utf-8") as fh:
        manifest = json.load(fh)
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(json.dumps({"stdin": json.loads(body), "env": env, "manifest": manifest}) + "\\n")
"""


@dataclass
class Received:
    """One POST as the receiver judged it: ``problem`` None means authentic and fresh."""

    headers: dict[str, str]
    body: bytes
    problem: str | None
    status: int

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    url: str
    secret: bytes
    received: list[Received] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    """Answers to give, first first (then 200): e.g. [503] makes the first attempt fail."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[Received]:
        """Authentic, fresh deliveries this receiver answered 200."""
        with self.lock:
            return [r for r in self.received if r.problem is None and r.status == 200]


@contextmanager
def webhook_receiver(secret: bytes, statuses: list[int] | None = None) -> Iterator[Receiver]:
    """A threaded HTTP server on 127.0.0.1 (a free port) that checks every POST's signature and timestamp."""
    state: dict[str, Receiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            r = state["r"]
            problem = signing.verify(
                r.secret,
                self.headers.get(signing.TIMESTAMP_HEADER),
                self.headers.get(signing.SIGNATURE_HEADER),
                body,
                now=time.time(),
            )
            with r.lock:
                status = r.statuses.pop(0) if r.statuses else (401 if problem else 200)
                r.received.append(Received({k: v for k, v in self.headers.items()}, body, problem, status))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = Receiver(f"http://127.0.0.1:{server.server_address[1]}/hook", secret, statuses=list(statuses or []))
    state["r"] = receiver
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def recorder_command(tmp_path: Path) -> tuple[list[str], Path]:
    """``argv`` of a command that appends its stdin, environment and export manifest to a JSON-lines file."""
    script = tmp_path / "record_alert.py"
    script.write_text(RECORDER)
    out = tmp_path / "commands.jsonl"
    return [sys.executable, str(script), str(out)], out


def recorded(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
