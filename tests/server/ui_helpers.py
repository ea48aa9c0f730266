"""Helpers for the dashboard tests: sign in through the real form, read ids and CSRF tokens from the HTML."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

from .conftest import ADMIN, AUTH

PAGE_HEADERS = ("content-security-policy", "x-frame-options", "x-content-type-options", "referrer-policy")


def login_form_csrf(client: TestClient) -> str:
    page = client.get("/ui/login")
    assert page.status_code == 200
    return csrf_of(page.text)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF field on the page"
    return found.group(1)


def sign_in(client: TestClient, token: str = ADMIN) -> str:
    """Sign ``client`` in with ``token``; returns the session's CSRF token (read from the overview page)."""
    resp = client.post(
        "/ui/login", data={"token": token, "csrf": login_form_csrf(client), "next": "/ui/"}, follow_redirects=False
    )
    assert resp.status_code == 303, resp.text
    page = client.get("/ui/")
    assert page.status_code == 200 and 'id="whoami"' in page.text
    return csrf_of(page.text)


def new_token(client: TestClient, role: str, name: str | None = None) -> str:
    resp = client.post("/api/v1/tokens", json={"role": role, "name": name or role}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    token: str = resp.json()["token"]
    return token


def browser(client: TestClient) -> TestClient:
    """A second client on the same app with its own cookie jar (another person's browser)."""
    return TestClient(client.app)


def error_message(html: str) -> str:
    found = re.search(r'id="error-message"[^>]*>([^<]*)<', html)
    return found.group(1) if found else ""


def fleet(client: TestClient, n: int, profile: str = "x86", prefix: str = "d", **labels: Any) -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    for dev_id in ids:
        resp = client.post(
            "/api/v1/devices",
            json={"device_id": dev_id, "hardware_profile": profile, "labels": {"ring": "a", **labels}},
            headers=AUTH,
        )
        assert resp.status_code == 201, resp.text
    return ids
