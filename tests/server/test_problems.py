"""The one exception handler: each domain error becomes problem+json with its status, reason and headers."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgeota_contract.errors import BundleError, ContractError, EdgeotaError, SignatureError
from edgeota_contract.states import ReasonCode
from ota_server.core.problems import PROBLEM_JSON, ApiError, install_problem_handlers, status_of
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

CASES: list[tuple[EdgeotaError, int, str, str | None]] = [
    (Unauthenticated("invalid token"), 401, "Unauthorized", None),
    (PermissionDenied("needs admin"), 403, "Forbidden", None),
    (NotFound("release r1 not found"), 404, "Not Found", None),
    (Conflict("device d1 already exists"), 409, "Conflict", None),
    (TooLarge("bundle exceeds the 10 byte limit"), 413, "Content Too Large", None),
    (InvalidRequest("since must not be after until"), 422, "Unprocessable Content", "malformed_message"),
    (MalformedInput("body is not a valid .npz"), 400, "Bad Request", "malformed_message"),
    (RateLimited("slow down"), 429, "Too Many Requests", None),
    (RateLimited("slow down", retry_after=5), 429, "Too Many Requests", None),
    (ServerError("something the table does not name"), 400, "Bad Request", None),
    (BundleError("tampered"), 422, "Unprocessable Content", "bundle_invalid"),
    (SignatureError("unknown key", ReasonCode.UNKNOWN_KEY), 422, "Unprocessable Content", "unknown_key"),
    (ContractError("bad manifest"), 422, "Unprocessable Content", "malformed_message"),
    (EdgeotaError("plain"), 400, "Bad Request", "internal_error"),
    (NotFound("gone", ReasonCode.NOT_IN_REPOSITORY), 404, "Not Found", "not_in_repository"),
]


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.get("/raise/{index}")
    def _raise(index: int) -> None:
        if index == len(CASES):
            raise ApiError(
                416, "Range Not Satisfiable", "range 9-10 outside 0-3", headers={"Content-Range": "bytes */4"}
            )
        raise CASES[index][0]

    return TestClient(app)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[type(c[0]).__name__ for c in CASES])
def test_domain_error_becomes_its_problem(client: TestClient, index: int) -> None:
    exc, status, title, reason = CASES[index]
    resp = client.get(f"/raise/{index}")
    assert resp.status_code == status == status_of(exc)
    assert resp.headers["content-type"] == PROBLEM_JSON
    body = resp.json()
    assert (body["status"], body["title"], body["detail"]) == (status, title, str(exc))
    assert body["instance"] == f"/raise/{index}"
    assert body.get("reason") == reason
    # Only a 401 says how to authenticate; a rate limit says when to come back when it knows.
    assert resp.headers.get("www-authenticate") == ("Bearer" if status == 401 else None)
    assert resp.headers.get("retry-after") == ("5" if getattr(exc, "retry_after", None) else None)


def test_http_specific_error_keeps_its_headers(client: TestClient) -> None:
    resp = client.get(f"/raise/{len(CASES)}")
    assert resp.status_code == 416 and resp.headers["content-range"] == "bytes */4"
    assert resp.json()["detail"] == "range 9-10 outside 0-3" and "reason" not in resp.json()
