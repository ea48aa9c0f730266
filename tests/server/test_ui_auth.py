"""Dashboard sign-in: token -> session cookie (flags), CSRF on every POST, sign-out, security headers, revocation."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.main import create_app
from ota_server.models import ApiToken

from .conftest import ADMIN, AUTH
from .ui_helpers import PAGE_HEADERS, browser, csrf_of, error_message, login_form_csrf, new_token, sign_in


def _set_cookies(resp: object) -> list[str]:
    return resp.headers.get_list("set-cookie")  # type: ignore[attr-defined,no-any-return]


def test_root_redirects_and_pages_need_a_session(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    resp = client.get("/ui/devices?profile=x86", follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/login?next=%2Fui%2Fdevices%3Fprofile%3Dx86"
    assert client.get("/ui/rollouts/abc/live.json").status_code == 401


def test_sign_in_sets_a_strict_httponly_cookie_and_sign_out_ends_the_session(client: TestClient) -> None:
    resp = client.post(
        "/ui/login",
        data={"token": ADMIN, "csrf": login_form_csrf(client), "next": "/ui/devices"},
        follow_redirects=False,
    )
    assert resp.status_code == 303 and resp.headers["location"] == "/ui/devices"
    cookie = next(c for c in _set_cookies(resp) if c.startswith("edgeota_ui="))
    flags = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/"} <= flags
    assert "secure" not in flags  # public_url is http
    assert ADMIN not in cookie  # the token never goes into the cookie
    page = client.get("/ui/")
    assert page.status_code == 200 and 'data-role="admin"' in page.text
    stolen = client.cookies.get("edgeota_ui")
    csrf = csrf_of(page.text)
    # Sign-out needs the CSRF token too.
    assert client.post("/ui/logout", data={}).status_code == 403
    out = client.post("/ui/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/ui/login"
    assert client.get("/ui/", follow_redirects=False).status_code == 303
    # The old cookie is worthless once signed out (the session is gone on the server).
    other = browser(client)
    other.cookies.set("edgeota_ui", stolen or "")
    assert other.get("/ui/", follow_redirects=False).status_code == 303


def test_cookie_is_secure_when_the_public_url_is_https(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"public_url": "https://ota.example"}))
    with TestClient(app, base_url="https://testserver") as client:
        resp = client.post("/ui/login", data={"token": ADMIN, "csrf": login_form_csrf(client)}, follow_redirects=False)
        cookie = next(c for c in _set_cookies(resp) if c.startswith("edgeota_ui="))
        assert "secure" in {p.strip().lower() for p in cookie.split(";")}
    app.state.ctx.engine.dispose()


def test_bad_tokens_are_refused_with_the_form_again(client: TestClient) -> None:
    resp = client.post(
        "/api/v1/devices", json={"device_id": "d1", "hardware_profile": "x86", "labels": {}}, headers=AUTH
    )
    assert resp.status_code == 201, resp.text
    device = resp.json()
    for token in ("nonsense", "abc.def", ADMIN + "x", device["token"], "x" * 600):
        resp = client.post("/ui/login", data={"token": token, "csrf": login_form_csrf(client)}, follow_redirects=False)
        assert resp.status_code == 401, token
        assert 'id="login-error"' in resp.text and not any(c.startswith("edgeota_ui=") for c in _set_cookies(resp))


def test_sign_in_without_the_forms_csrf_is_refused(client: TestClient) -> None:
    login_form_csrf(client)  # the login cookie is set, but the field is missing or wrong
    for data in ({"token": ADMIN}, {"token": ADMIN, "csrf": "0" * 64}):
        resp = client.post("/ui/login", data=data, follow_redirects=False)
        assert resp.status_code == 403 and "sign-in form" in error_message(resp.text)
    fresh = browser(client)  # no login cookie at all
    assert fresh.post("/ui/login", data={"token": ADMIN, "csrf": "x"}).status_code == 403


def test_open_redirects_are_not_followed(client: TestClient) -> None:
    for target in ("https://evil.example/", "//evil.example/", "/api/v1/devices"):
        resp = client.post(
            "/ui/login", data={"token": ADMIN, "csrf": login_form_csrf(client), "next": target}, follow_redirects=False
        )
        assert resp.headers["location"] == "/ui/", target


def test_forged_or_tampered_cookies_are_refused(client: TestClient) -> None:
    sign_in(client)
    good = client.cookies.get("edgeota_ui") or ""
    secret, _, mac = good.rpartition(".")
    for bad in (secret, f"{secret}.{'0' * len(mac)}", f"{secret}x.{mac}", "%C3%A9.abc", ""):
        other = browser(client)
        other.cookies.set("edgeota_ui", bad)
        assert other.get("/ui/", follow_redirects=False).status_code == 303, bad


def test_revoking_the_token_ends_its_sessions(client: TestClient, ctx: ServerContext) -> None:
    token = new_token(client, "operator", "ops")
    sign_in(client, token)
    with ctx.sessions() as session:
        row = session.get(ApiToken, token.split(".")[0])
        assert row is not None
        row.revoked = True
        session.commit()
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_security_headers_on_every_dashboard_response(client: TestClient) -> None:
    csrf = sign_in(client)
    responses = [
        client.get("/ui/login"),
        client.get("/ui/"),
        client.get("/ui/devices?state=nonsense"),  # a 400 page
        client.get("/ui/rollouts/unknown"),  # a 404 page
        client.get("/ui/static/dashboard.js"),
        client.get("/", follow_redirects=False),
        client.post("/ui/devices/labels", data={"csrf": "wrong"}),  # a 403 page
        client.get("/docs"),
    ]
    for resp in responses:
        for name in PAGE_HEADERS:
            assert name in resp.headers, (resp.request.url, name)
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["x-content-type-options"] == "nosniff"
    assert csrf
    # Pages carry no inline script and no handler attributes.
    html = client.get("/ui/").text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"\son[a-z]+=", html)
    # The JSON API keeps its own headers.
    assert "content-security-policy" not in client.get("/healthz").headers


def test_posts_need_a_form_body_and_a_small_one(client: TestClient) -> None:
    csrf = sign_in(client)
    assert client.post("/ui/devices/labels", json={"csrf": csrf}).status_code == 415
    big = {"csrf": csrf, "device_ids": ["x" * 60] * 5000}
    assert client.post("/ui/devices/labels", data=big).status_code == 413


def test_unknown_dashboard_paths_are_a_404_page(client: TestClient) -> None:
    sign_in(client)
    resp = client.get("/ui/no/such/page")
    assert resp.status_code == 404 and "no dashboard page" in error_message(resp.text)


def test_a_crafted_flash_is_not_shown(client: TestClient) -> None:
    sign_in(client)
    client.cookies.set("edgeota_ui_flash", "Your%20session%20expired.deadbeef", path="/ui")
    assert 'id="flash"' not in client.get("/ui/?flash=go%20to%20evil.example").text


def test_unstorable_form_text_is_a_400_page(client: TestClient) -> None:
    csrf = sign_in(client)
    for body in (f"csrf={csrf}&reason=a%00b", f"csrf={csrf}&reason=%ff%fe", f"csrf={csrf}&key=%00"):
        resp = client.post(
            "/ui/devices/labels", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert resp.status_code == 400, body
    assert client.get("/ui/devices?q=%00").status_code in (400, 422)  # refused at the edge, never stored


def test_changing_the_bootstrap_token_ends_its_sessions(client: TestClient, ctx: ServerContext) -> None:
    from pydantic import SecretStr

    sign_in(client)
    assert client.get("/ui/", follow_redirects=False).status_code == 200
    ctx.settings = ctx.settings.model_copy(update={"admin_token": SecretStr("another-admin-token-0123456789")})
    assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_repeated_failed_sign_ins_are_throttled(client: TestClient) -> None:
    for _ in range(10):
        bad = client.post("/ui/login", data={"token": "wrong.token", "csrf": login_form_csrf(client)})
        assert bad.status_code == 401
    blocked = client.post("/ui/login", data={"token": ADMIN, "csrf": login_form_csrf(client)})
    assert blocked.status_code == 429 and "too many failed sign-ins" in error_message(blocked.text)


def test_the_throttle_forgets_old_failures() -> None:
    from ota_server.web.auth import SignInThrottle

    throttle = SignInThrottle(limit=2, window=60)
    throttle.failed("a", now=0)
    throttle.failed("a", now=1)
    assert throttle.blocked("a", now=2) and not throttle.blocked("b", now=2)
    assert not throttle.blocked("a", now=62)
