"""Templates, HTML error pages, the signed-in user and posted forms for the dashboard's routes.

:class:`UiRoute` turns every deliberate error inside a dashboard route into an HTML page with the right status
(a validation error or :class:`~ota_server.errors.InvalidRequest` 400, :class:`~ota_server.errors.NotFound` 404,
a wrong role or CSRF token 403, a conflict 409), never the API's problem+json and never a 500; a page asked for
without a session redirects to the sign-in page.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote, unquote

from fastapi import Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from ota_server.context import ServerContext
from ota_server.core.problems import status_of
from ota_server.core.security import Role
from ota_server.errors import InvalidRequest
from ota_server.web.auth import COOKIE, UiUser, cookie_key, csrf_ok, load_session, sign, unsign

log = logging.getLogger("edgeota.server.ui")
TEMPLATES = Path(__file__).parent / "templates"
MAX_FORM_BYTES = 256 * 1024
"""A posted form larger than this is refused (413): the largest real one is a bulk-label form of 500 device ids."""


class UiError(Exception):
    """A dashboard answer other than the page: status and a one-line message shown on the error page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class LoginRequired(Exception):
    """No valid session: pages redirect to the sign-in form, JSON endpoints answer 401."""


def _ts(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S UTC")
        except ValueError:
            return value
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: float | int | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


ENV = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(default=True))
ENV.filters.update(ts=_ts, num=_num, pct=_pct, size=_size, q=lambda v: quote(str(v), safe=""))


FLASH_COOKIE = "edgeota_ui_flash"
"""The one-line outcome of the last action, shown once by the next page: a signed cookie, so a crafted link cannot
put words on the page."""


def render(request: Request, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    """The HTML of ``template`` with ``values``, the signed-in user (if any), the current path and a pending flash."""
    user = getattr(request.state, "ui_user", None)
    ctx: ServerContext = request.app.state.ctx
    raw = request.cookies.get(FLASH_COOKIE)
    flash = unquote(unsign(cookie_key(ctx), raw) or "") if raw else ""
    html = ENV.get_template(template).render(user=user, path=request.url.path, Role=Role, flash=flash, **values)
    resp = HTMLResponse(html, status_code=status)
    if raw:
        resp.delete_cookie(FLASH_COOKIE, path="/ui", httponly=True, samesite="strict")
    return resp


def flash_redirect(request: Request, url: str, message: str) -> RedirectResponse:
    """A 303 to ``url`` whose page shows ``message`` once (a short-lived signed cookie)."""
    ctx: ServerContext = request.app.state.ctx
    resp = RedirectResponse(url, status_code=303)
    secure = str(ctx.settings.public_url).lower().startswith("https://")
    value = sign(cookie_key(ctx), quote(message[:200], safe=""))
    resp.set_cookie(FLASH_COOKIE, value, max_age=60, path="/ui", httponly=True, samesite="strict", secure=secure)
    return resp


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status=status, status_code=status, message=message)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
    return f"{where}: {first.get('msg', 'invalid')}"


def _wants_json(request: Request) -> bool:
    return request.url.path.endswith(".json")


class UiRoute(APIRoute):
    """A dashboard route: errors become HTML pages (or JSON for ``*.json`` endpoints), see the module docstring."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        original = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                return await original(request)
            except LoginRequired:
                if _wants_json(request):
                    return JSONResponse({"error": "not signed in"}, status_code=401)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                nxt = target if request.method == "GET" else "/ui/"
                return RedirectResponse(f"/ui/login?next={quote(nxt, safe='')}", status_code=303)
            except UiError as exc:
                status, message = exc.status, exc.message
            except RequestValidationError as exc:
                status, message = 400, _validation_message(exc)
            except InvalidRequest as exc:  # a bad filter or form value: the page's 400, not the API's 422
                status, message = 400, str(exc)
            except EdgeotaError as exc:
                status, message = status_of(exc), str(exc)
            except StarletteHTTPException as exc:
                status, message = exc.status_code, str(exc.detail)
            if _wants_json(request):
                return JSONResponse({"error": message}, status_code=status)
            log_event(log, "ui_refused", logging.INFO, path=request.url.path, status=status, detail=message[:200])
            return error_page(request, status, message)

        return handler


async def ctx_of(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.ctx
    return ctx


async def current_user(request: Request) -> UiUser:
    """The signed-in user (also kept on ``request.state.ui_user`` for the templates); LoginRequired when none."""
    ctx: ServerContext = request.app.state.ctx
    with ctx.sessions() as session:
        user = load_session(ctx, session, request.cookies.get(COOKIE))
    if user is None:
        raise LoginRequired()
    request.state.ui_user = user
    return user


User = Annotated[UiUser, Depends(current_user)]
Ctx = Annotated[ServerContext, Depends(ctx_of)]


class Form:
    """A posted ``application/x-www-form-urlencoded`` body: every value of every field, in order."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.values: dict[str, list[str]] = {}
        for key, value in pairs:
            self.values.setdefault(key, []).append(value)

    def get(self, key: str, default: str = "") -> str:
        values = self.values.get(key)
        return values[0] if values else default

    def all(self, key: str) -> list[str]:
        return list(self.values.get(key, []))


async def read_form(request: Request) -> Form:
    """The posted form (empty when nothing was posted). UiError 413 when too large, 415 when not urlencoded, 400 when
    it does not parse, is not UTF-8 or holds a NUL."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise UiError(413, f"form larger than {MAX_FORM_BYTES} bytes")
    if not body:
        return Form([])  # an empty post: then the CSRF check refuses it (403)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise UiError(415, "forms must be posted as application/x-www-form-urlencoded")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000, encoding="utf-8", errors="strict"
        )
    except (UnicodeDecodeError, ValueError) as exc:
        raise UiError(400, f"form does not parse: {exc}") from exc
    # The database cannot store NUL (PostgreSQL): refused here, as the API's edge refuses it in JSON and queries.
    if any("\x00" in key or "\x00" in value for key, value in pairs):
        raise UiError(400, "form values must not contain NUL characters")
    return Form(pairs)


async def checked_form(request: Request, user: User) -> Form:
    """The posted form of a signed-in user, after its CSRF token was checked (UiError 403 when wrong or missing)."""
    form = await read_form(request)
    if not csrf_ok(user.csrf, form.get("csrf") or None):
        raise UiError(403, "missing or wrong CSRF token: reload the page and try again")
    return form


CheckedForm = Annotated[Form, Depends(checked_form)]


def require_role(user: UiUser, role: Role, what: str) -> None:
    """UiError 403 unless ``user`` has at least ``role``."""
    if not user.may(role):
        raise UiError(403, f"{what} needs the {role.value} role (you are {user.role.value})")
