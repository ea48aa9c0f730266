"""Sign-in and sign-out, the root redirect, the dashboard's static files and the offline API docs."""

from __future__ import annotations

import importlib.util
import mimetypes
import secrets
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from ota_server.web.auth import (
    COOKIE,
    LOGIN_COOKIE,
    SESSION_HOURS,
    SignInThrottle,
    cookie_key,
    csrf_ok,
    login_csrf,
    sign,
    sign_in,
    sign_out,
    unsign,
)
from ota_server.web.render import Ctx, Form, UiError, UiRoute, User, checked_form, read_form, render

router = APIRouter(route_class=UiRoute, include_in_schema=False)
STATIC = Path(__file__).parent / "static"
STATIC_FILES = frozenset(p.name for p in STATIC.iterdir() if p.is_file())


def _docs_assets() -> Path | None:
    """The folder of Swagger UI's and ReDoc's dist files shipped by the ``fastapi-offline`` package, if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if folder.is_dir() else None


DOCS_ASSETS = _docs_assets()
DOCS_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"})


def _secure(request: Request) -> bool:
    ctx = request.app.state.ctx
    return str(ctx.settings.public_url).lower().startswith("https://")


def _safe_next(value: str | None) -> str:
    """Only a local dashboard path: an open redirect to another site is never followed."""
    if value and value.startswith("/ui") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/"


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/static/{name}")
def static(name: str) -> FileResponse:
    if name not in STATIC_FILES:
        raise UiError(404, f"no static file {name}")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(STATIC / name, media_type=kind, headers={"Cache-Control": "public, max-age=300"})


@router.get("/ui/docs-assets/{name}")
def docs_asset(name: str) -> FileResponse:
    if DOCS_ASSETS is None or name not in DOCS_FILES or not (DOCS_ASSETS / name).is_file():
        raise UiError(404, f"no API docs asset {name} (is the fastapi-offline package installed?)")
    kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(DOCS_ASSETS / name, media_type=kind, headers={"Cache-Control": "public, max-age=86400"})


@router.get("/docs")
def swagger(request: Request) -> HTMLResponse:
    return render(request, "docs_swagger.html", available=DOCS_ASSETS is not None)


@router.get("/redoc")
def redoc(request: Request) -> HTMLResponse:
    return render(request, "docs_redoc.html", available=DOCS_ASSETS is not None)


@router.get("/ui/login")
def login_form(request: Request, next: Annotated[str, Query(max_length=512)] = "/ui/") -> HTMLResponse:
    ctx = request.app.state.ctx
    nonce = secrets.token_urlsafe(24)
    resp = render(request, "login.html", next=_safe_next(next), csrf=login_csrf(cookie_key(ctx), nonce), error="")
    _set_cookie(request, resp, LOGIN_COOKIE, nonce, max_age=3600, signed=True)
    return resp


def _set_cookie(request: Request, resp: Response, name: str, value: str, max_age: int, signed: bool = False) -> None:
    if signed:
        value = sign(cookie_key(request.app.state.ctx), value)
    resp.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="strict", secure=_secure(request))


@router.post("/ui/login")
async def login(request: Request, ctx: Ctx) -> Response:
    """A good token: a new session and a redirect to ``next``; a bad one: the form again with 401."""
    form: Form = await read_form(request)
    nonce = unsign(cookie_key(ctx), request.cookies.get(LOGIN_COOKIE))
    nxt = _safe_next(form.get("next"))
    if nonce is None or not csrf_ok(login_csrf(cookie_key(ctx), nonce), form.get("csrf")):
        raise UiError(403, "the sign-in form expired or was not this server's: open the sign-in page again")
    throttle: SignInThrottle = request.app.state.ui_throttle
    client = request.client.host if request.client else "?"
    if throttle.blocked(client):
        raise UiError(429, "too many failed sign-ins from this address: wait a minute")

    def work() -> str | None:
        with ctx.sessions() as session:
            out = sign_in(ctx, session, form.get("token"))
            if out is None:
                return None
            session.commit()
            return out[0]

    cookie = await run_in_threadpool(work)
    if cookie is None:
        throttle.failed(client)
        new_nonce = secrets.token_urlsafe(24)
        resp: Response = render(
            request,
            "login.html",
            status=401,
            next=nxt,
            csrf=login_csrf(cookie_key(ctx), new_nonce),
            error="That token was not accepted (unknown, revoked, or a device token).",
        )
        _set_cookie(request, resp, LOGIN_COOKIE, new_nonce, max_age=3600, signed=True)
        return resp
    resp = RedirectResponse(nxt, status_code=303)
    _set_cookie(request, resp, COOKIE, cookie, max_age=SESSION_HOURS * 3600)
    resp.delete_cookie(LOGIN_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return resp


@router.post("/ui/logout")
async def logout(request: Request, ctx: Ctx, user: User) -> RedirectResponse:
    await checked_form(request, user)

    def work() -> None:
        with ctx.sessions() as session:
            sign_out(session, user)
            session.commit()

    await run_in_threadpool(work)
    resp = RedirectResponse("/ui/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request))
    return resp
