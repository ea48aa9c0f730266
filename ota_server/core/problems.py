"""RFC 9457 problem-details responses for every error the API returns.

One handler maps the domain errors (:mod:`ota_server.errors`, and any other :class:`EdgeotaError`) to a
status through :data:`STATUS_OF`; routes raise :class:`ApiError` only for answers that are HTTP itself
(a ``Content-Range`` on 416).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeota_contract.errors import BundleError, ContractError, EdgeotaError, SignatureError
from edgeota_contract.logs import log_event
from edgeota_contract.states import ReasonCode
from ota_server.db import is_transient_conflict
from ota_server.errors import (
    Conflict,
    InvalidRequest,
    MalformedInput,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    TooLarge,
    Unauthenticated,
)

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("edgeota.server.api")

# Most specific first: the first class an error is an instance of gives its status. Any other
# EdgeotaError is 400.
STATUS_OF: tuple[tuple[type[EdgeotaError], int], ...] = (
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (Conflict, 409),
    (TooLarge, 413),
    (InvalidRequest, 422),
    (MalformedInput, 400),
    (RateLimited, 429),
    (BundleError, 422),
    (SignatureError, 422),
    (ContractError, 422),
)
# What a 401 must carry (RFC 9110 section 11.6.1).
_HEADERS_OF = {401: {"WWW-Authenticate": "Bearer"}}


class ApiError(EdgeotaError):
    """An error that is HTTP itself (a status with its own headers), rendered as problem details."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str = "",
        reason: ReasonCode | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or title, reason)
        self.status = status
        self.title = title
        self.detail = detail or title
        self.headers = headers or {}
        self.explicit_reason = reason


def status_of(exc: EdgeotaError) -> int:
    """The HTTP status of a domain error (400 for an EdgeotaError the table does not name)."""
    if isinstance(exc, ApiError):
        return exc.status
    for cls, status in STATUS_OF:
        if isinstance(exc, cls):
            return status
    return 400


def problem(status: int, title: str, detail: str, instance: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    429: "Too Many Requests",
}


def install_problem_handlers(app: FastAPI) -> None:
    """Map every exception to a problem-details body; unexpected ones to a logged 500."""

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = _TITLES.get(exc.status_code, "Error")
        resp = problem(exc.status_code, title, str(exc.detail), request.url.path)
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "invalid"))} for err in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        detail = f"{'.'.join(first['loc'])}: {first['msg']}"
        return problem(422, "Unprocessable Content", detail, request.url.path, errors=errors)

    @app.exception_handler(EdgeotaError)
    async def _edgeota_error(request: Request, exc: EdgeotaError) -> JSONResponse:
        return edgeota_problem(exc, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_transient_conflict(exc):
            # Rolled back whole: nothing was changed, so the same request may simply be sent again.
            log_event(log, "database_conflict", logging.WARNING, path=request.url.path, error=repr(exc)[:300])
            resp = problem(
                503, "Service Unavailable", "the database was busy (a lock conflict); retry", request.url.path
            )
            resp.headers["Retry-After"] = "1"
            return resp
        log_event(log, "unhandled_error", logging.ERROR, path=request.url.path, error=repr(exc))
        return problem(500, "Internal Server Error", "unexpected server error", request.url.path)


def edgeota_problem(exc: EdgeotaError, instance: str) -> JSONResponse:
    """The problem-details answer for a deliberate error: status from :func:`status_of`, ``reason`` when it says
    something (a server error's base default, ``internal_error``, would only mislead a client)."""
    status = status_of(exc)
    if isinstance(exc, ApiError):
        title, detail, reason, headers = exc.title, exc.detail, exc.explicit_reason, exc.headers
    else:
        title, detail, headers = _TITLES.get(status, "Error"), str(exc), dict(_HEADERS_OF.get(status, {}))
        if isinstance(exc, RateLimited) and exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        reason = None if isinstance(exc, ServerError) and exc.reason is ReasonCode.INTERNAL_ERROR else exc.reason
    extra = {"reason": reason.value} if reason is not None else {}
    resp = problem(status, title, detail, instance, **extra)
    resp.headers.update(headers)
    return resp
