"""RFC 9457 problem-details responses for every error the API returns."""

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

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("edgeota.server.api")


class ApiError(EdgeotaError):
    """An error with an HTTP status, rendered as problem details."""

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
}


def install_problem_handlers(app: FastAPI) -> None:
    """Map every exception to a problem-details body; unexpected ones to a logged 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        extra = {"reason": exc.explicit_reason.value} if exc.explicit_reason else {}
        resp = problem(exc.status, exc.title, exc.detail, request.url.path, **extra)
        resp.headers.update(exc.headers)
        return resp

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
        status = 422 if isinstance(exc, BundleError | SignatureError | ContractError) else 400
        return problem(status, _TITLES[status], str(exc), request.url.path, reason=exc.reason.value)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log_event(log, "unhandled_error", logging.ERROR, path=request.url.path, error=repr(exc))
        return problem(500, "Internal Server Error", "unexpected server error", request.url.path)
