"""Refuse text no database can store before any route sees it.

PostgreSQL's ``text`` cannot hold NUL, and neither PostgreSQL nor any UTF-8 encoder takes a lone UTF-16
surrogate or bytes that are not UTF-8; SQLite stores them, so the same request succeeded on one backend
and failed with a 500 on the other. :class:`RefuseUnstorableText` checks every input of every request
at the edge, in one place, so no route, schema or service has to remember it:

- the path and each query parameter name and value, percent-decoded, as bytes: NUL, or not UTF-8 (an
  encoded surrogate is not UTF-8 either);
- a JSON body (``application/json`` or ``+json``): every string and every object key, after JSON
  unescaping (``\\u0000``, ``\\ud800``). Only bodies that contain a ``\\u`` escape are parsed here; a
  raw NUL or a byte that is not UTF-8 makes the body invalid JSON, which the route's validation refuses.

Other bodies (bundle and sample uploads) are binary and go to their routes untouched. A refusal is a
422 problem-details answer naming where the text was. Device messages (MQTT) get the same check in the
ingest writers (:func:`json_body_problem`): such a message is ``malformed``, not a database error that
the device would re-send forever.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]

DETAIL = "text that cannot be stored (a NUL character, a lone surrogate or bytes that are not UTF-8) in the {}"


def storable_bytes(raw: bytes) -> bool:
    """Whether decoded URL bytes are UTF-8 text without NUL."""
    if b"\x00" in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def storable_text(text: str) -> bool:
    """Whether ``text`` has neither NUL nor a lone surrogate (so it encodes to UTF-8 and fits PostgreSQL)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def storable_json(value: Any) -> bool:
    """Whether every string and key inside a parsed JSON value is :func:`storable_text` (iterative: no depth limit)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not storable_text(item):
                return False
        elif isinstance(item, dict):
            for key, inner in item.items():
                if not storable_text(key):
                    return False
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
    return True


def json_body_problem(body: bytes) -> bool:
    """Whether a JSON body carries unstorable text in an escape. Unparseable bodies are left to the route."""
    if b"\\u" not in body:
        return False
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return not storable_json(value)


def url_problem(scope: Scope) -> str | None:
    """``"path"`` or ``"query"`` when that part of the URL holds unstorable text, else None."""
    raw_path = scope.get("raw_path")
    if raw_path is None:
        raw_path = str(scope.get("path", "")).encode("utf-8", "surrogateescape")
    if not storable_bytes(unquote_to_bytes(bytes(raw_path))):
        return "path"
    query = bytes(scope.get("query_string", b""))
    for pair in query.split(b"&"):
        for part in pair.split(b"=", 1):
            if not storable_bytes(unquote_to_bytes(part.replace(b"+", b" "))):
                return "query"
    return None


def _is_json(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            media = bytes(value).split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False


class RefuseUnstorableText:
    """ASGI middleware: a request with unstorable text in its URL or JSON body gets a 422 problem answer."""

    def __init__(self, app: Asgi) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = url_problem(scope)
        if where is None and _is_json(scope):
            messages: list[Message] = []
            body = b""
            while True:
                message = await receive()
                messages.append(message)
                if message["type"] != "http.request":
                    break
                body += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            if json_body_problem(body):
                where = "body"
            else:
                receive = _replay(messages, receive)
        if where is not None:
            from ota_server.core.problems import problem  # only the middleware needs the web stack

            response = problem(422, "Unprocessable Content", DETAIL.format(where), str(scope.get("path", "")))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that hands out the already-read ``messages`` first, then the real one."""
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay
