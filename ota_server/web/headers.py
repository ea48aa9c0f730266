"""Security headers on every dashboard and API-docs response (a pure ASGI middleware: no body buffering).

Pages get a Content-Security-Policy without inline script or style (``default-src 'self'``, ``frame-ancestors
'none'``); the Swagger UI and ReDoc pages allow inline *styles* only (both inject ``<style>`` at run time) and
``blob:`` workers (ReDoc), never inline script. Every covered response also gets ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` and, unless the route set its own,
``Cache-Control: no-store`` (pages show live fleet data and hold a CSRF token), and ``Server-Timing: app;dur=<ms>``
(the time until the response started, for benchmarks and browsers' developer tools).
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DOCS_PATHS = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})


def covered(path: str) -> str | None:
    """The CSP for ``path``, or None when the path is not the dashboard's (the JSON API keeps its own headers)."""
    if path in DOCS_PATHS:
        return DOCS_CSP
    if path == "/" or path == "/ui" or path.startswith("/ui/"):
        return PAGE_CSP
    return None


class SecurityHeaders:
    """Adds the headers above to responses whose path :func:`covered` names."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = covered(scope.get("path", ""))
        if csp is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {name.lower() for name, _ in headers}
                extra = [
                    (b"content-security-policy", csp.encode()),
                    (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if b"cache-control" not in names:
                    extra.append((b"cache-control", b"no-store"))
                elapsed_ms = (time.perf_counter() - started) * 1000
                extra.append((b"server-timing", f"app;dur={elapsed_ms:.1f}".encode()))
                headers = [(n, v) for n, v in headers if n.lower() not in {e[0] for e in extra}] + extra
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
