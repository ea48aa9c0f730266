"""A database lock conflict (deadlock, serialization failure, SQLite busy) answers 503 with Retry-After, never a
500; the API client sends such a request again and gives up after RETRIES_ON_503 tries."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from ota_server.client import RETRIES_ON_503, ApiClient, ApiClientError
from ota_server.core.problems import install_problem_handlers
from ota_server.db import is_transient_conflict, retry_transient


class _PgError(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"sqlstate {sqlstate}")
        self.sqlstate = sqlstate


def _app(exc: Exception) -> TestClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/boom")
    def boom() -> None:
        raise exc

    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("sqlstate", ["40P01", "40001", "55P03"])
def test_postgresql_conflicts_answer_503_with_retry_after(sqlstate: str) -> None:
    resp = _app(OperationalError("UPDATE ...", {}, _PgError(sqlstate))).post("/boom")
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    assert "retry" in resp.json()["detail"]


def test_sqlite_busy_is_a_conflict_and_other_errors_stay_500() -> None:
    assert is_transient_conflict(OperationalError("x", {}, Exception("database is locked")))
    assert not is_transient_conflict(OperationalError("x", {}, _PgError("42P01")))  # undefined table: a bug
    assert not is_transient_conflict(ValueError("x"))
    assert _app(OperationalError("x", {}, _PgError("42P01"))).post("/boom").status_code == 500


def test_client_retries_a_503_then_gives_up() -> None:
    calls: list[int] = []

    def busy_then_ok(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "busy"})
        return httpx.Response(200, json={"ok": True})

    api = ApiClient(http=httpx.Client(base_url="http://test", transport=httpx.MockTransport(busy_then_ok)))
    assert api.request("POST", "/x") == {"ok": True} and len(calls) == 3

    calls.clear()
    always = ApiClient(
        http=httpx.Client(
            base_url="http://test",
            transport=httpx.MockTransport(lambda r: httpx.Response(503, headers={"Retry-After": "0"}, json={})),
        )
    )
    with pytest.raises(ApiClientError, match="503"):
        always.request("POST", "/x")
    no_hint = ApiClient(
        http=httpx.Client(base_url="http://test", transport=httpx.MockTransport(lambda r: httpx.Response(503)))
    )
    with pytest.raises(ApiClientError, match="503"):
        no_hint.request("GET", "/x")  # no Retry-After: not the server's rolled-back answer, not retried
    assert RETRIES_ON_503 >= 1


def test_retry_transient_repeats_only_conflicts() -> None:
    calls: list[int] = []

    def conflict_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("UPDATE", {}, _PgError("40P01"))
        return "done"

    assert retry_transient(conflict_twice, delay=0) == "done" and len(calls) == 3
    calls.clear()
    with pytest.raises(OperationalError):
        retry_transient(lambda: _always(calls), delay=0)
    assert len(calls) == 4  # attempts, then the last conflict is raised
    calls.clear()

    def bug() -> None:
        calls.append(1)
        raise ValueError("not a conflict")

    with pytest.raises(ValueError):
        retry_transient(bug, delay=0)
    assert len(calls) == 1


def _always(calls: list[int]) -> None:
    calls.append(1)
    raise OperationalError("UPDATE", {}, _PgError("40001"))
