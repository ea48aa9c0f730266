"""The dashboard end to end: headless Chromium on the real pages of a real `edgeota server run` (SQLite), simulated
devices over the real Mosquitto, the network cut for the browser except loopback.

Proves: sign-in (a wrong token refused, an httponly cookie); a rollout's progress counted live in the page with no
reload; a failure-rate gate halting a rollout, shown in a banner with the gate; retrying only the failed devices;
rolling back; a device's deployment history with its reason codes; the timeline linked to the audit log; the
drifted feature found in the telemetry heat map; a viewer sees no action and its POST (valid session cookie and
CSRF token) is refused; Swagger UI and ReDoc render from packaged assets with no request leaving the machine.
Each main page is saved as a screenshot (tests/web/browser.py ``Screenshots``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from selenium.webdriver import Chrome
from selenium.webdriver.remote.webdriver import WebDriver

from .browser import Screenshots, console_errors, css, off_host_requests, page_name, requested_urls, wait_for
from .conftest import ADMIN_TOKEN, Dash, send_telemetry

pytestmark = pytest.mark.integration
COOKIE = "edgeota_ui"
LOADING = re.compile(r"Loading the \w+ '([^']+)' violates")
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?((?:https?:)?//(?!127\.0\.0\.1|localhost)[^"'\s>]+)""")


def progress(driver: WebDriver, stage: int = 0) -> dict[str, int]:
    """The stage's progress bar as the page shows it now (``data-*`` of ``#stage-{i}-progress``)."""
    bar = driver.find_element("css selector", f"#stage-{stage}-progress")
    names = ("committed", "failed", "in-progress", "size")
    return {n: int(bar.get_attribute(f"data-{n}") or 0) for n in names}


def rollout_state(driver: WebDriver) -> str:
    return str(driver.find_element("css selector", "#rollout-state").get_attribute("data-state"))


def confirm(driver: WebDriver, command: str, reason: str) -> None:
    """Click ``#action-<command>``, give a reason on the confirmation page, submit, wait for the flash message."""
    driver.find_element("css selector", f"#action-{command}").click()
    wait_for(driver, lambda d: css(d, "#confirm-form"), 15, f"the confirmation of {command}")
    driver.find_element("css selector", "#reason").send_keys(reason)
    driver.find_element("css selector", "#confirm-submit").click()
    wait_for(driver, lambda d: css(d, "#flash"), 15, f"the flash message after {command}")


def session_of(driver: WebDriver) -> tuple[str, str]:
    """The browser's session cookie and the CSRF token its pages carry (hidden field ``csrf``)."""
    cookie = driver.get_cookie(COOKIE)
    assert cookie is not None, f"no {COOKIE} cookie"
    field = driver.find_element("css selector", "input[name=csrf]")
    return str(cookie["value"]), str(field.get_attribute("value"))


def post_form(dash: Dash, path: str, cookie: str | None, data: dict[str, Any]) -> httpx.Response:
    """A form POST from outside the browser, as a script holding the session would send it (same origin)."""
    cookies = {COOKIE: cookie} if cookie is not None else {}
    headers = {"Origin": dash.url, "Referer": f"{dash.url}/ui/"}
    with httpx.Client(base_url=dash.url, cookies=cookies, timeout=10, follow_redirects=False) as client:
        return client.post(path, data=data, headers=headers)


def test_a_rollout_live_halted_retried_and_rolled_back(
    dash: Dash, open_browser: Callable[[], Chrome], shots: Screenshots
) -> None:
    tag = f"w{uuid.uuid4().hex[:6]}"
    base = dash.publish("1.0.0")
    new = dash.publish("1.1.0")
    sims = dash.devices(6, tag)
    (odd,) = dash.devices(1, tag, profile="rpi4")  # no bundle for this profile: listed as incompatible
    driver = open_browser()

    driver.get(f"{dash.url}/ui/login")
    driver.find_element("css selector", "#token").send_keys("not-a-token")
    driver.find_element("css selector", "#login-submit").click()
    wait_for(driver, lambda d: css(d, "#login-error"), 15, "the sign-in error")
    assert page_name(driver) == "login" and driver.get_cookie(COOKIE) is None
    shots.take(driver, "login")
    console_errors(driver)  # drains the log: the refused sign-in's 401 is expected
    dash.sign_in(driver, ADMIN_TOKEN)
    cookie = driver.get_cookie(COOKIE)
    assert cookie is not None and cookie["httpOnly"] is True
    assert driver.find_element("css selector", "#whoami").get_attribute("data-role") == "admin"

    # Live progress: the page is open before any device is connected; the script must count them in.
    first = dash.rollout(base, tag, stages=[{"percent": 100}], start=True)
    driver.get(f"{dash.url}/ui/rollouts/{first}")
    shown = progress(driver)
    assert (shown["committed"], shown["failed"], shown["size"]) == (0, 0, 6), shown
    assert [e.get_attribute("data-device-id") for e in css(driver, "#incompatible li[data-device-id]")] == [
        odd.device_id
    ]
    driver.execute_script("window.edgeotaNoReload = true;")
    for sim in sims:
        sim.connect()
    wait_for(driver, lambda d: progress(d)["committed"] == 6, 60, "6 committed, counted live")
    wait_for(driver, lambda d: rollout_state(d) == "completed", 30, "the rollout completed, live")
    assert driver.execute_script("return window.edgeotaNoReload === true;"), "the page reloaded"
    assert css(driver, "#live-status")
    shots.take(driver, "rollout-completed")

    # A failure-rate gate halts the next rollout: two devices fail their download (a transient fault).
    flaky = sims[:2]
    for sim in flaky:
        sim.flaky_downloads = 1
    second = dash.rollout(
        new, tag, stages=[{"percent": 100}], start=True, on_failure="pause", gates={"max_failure_rate": 0.0}
    )
    driver.get(f"{dash.url}/ui/rollouts/{second}")
    shown_banner = wait_for(driver, lambda d: [b for b in css(d, "#halt-banner") if b.is_displayed()], 60, "a banner")
    banner = shown_banner[0]
    status = dash.status(second)
    assert status["state"] == "paused" and status["reason"] == "gate_failed", status
    assert banner.get_attribute("data-halted-by") == status["halted_by"] == "failure_rate"
    assert "failure_rate" in banner.text, banner.text
    assert "fail" in banner.text.lower(), banner.text
    wait_for(driver, lambda d: progress(d)["failed"] == 2 and progress(d)["committed"] == 4, 30, "2 failed, 4 done")
    assert rollout_state(driver) == "paused"
    driver.refresh()  # the actions offered and the failed devices' list follow the page's rendering, not live
    wait_for(driver, lambda d: css(d, "#action-retry_failed"), 15, "the retry action of a halted rollout")
    failed_list = driver.find_element("css selector", "#failed-devices").text
    assert all(s.device_id in failed_list for s in flaky), failed_list
    assert not css(driver, "#action-pause")
    shots.take(driver, "rollout-halted")
    driver.get(f"{dash.url}/ui/")
    x86 = driver.find_element("css selector", "#devices-by-profile tr[data-profile=x86] td.online")
    assert x86.text.strip() == "6"
    assert [r.get_attribute("data-rollout-id") for r in css(driver, "#rollouts-active tr[data-rollout-id]")] == [second]
    shots.take(driver, "overview")
    driver.get(f"{dash.url}/ui/rollouts/{second}")

    # Retry only the failed devices: both install on their second attempt; the rollout stays paused.
    assigned = {s.device_id: len(s.assignments) for s in sims}
    confirm(driver, "retry_failed", "transient download fault")
    wait_for(driver, lambda d: progress(d)["failed"] == 0 and progress(d)["committed"] == 6, 60, "the retries done")
    assert {s.device_id for s in sims if len(s.assignments) > assigned[s.device_id]} == {s.device_id for s in flaky}
    assert all(s.models["digits"].version == "1.1.0" for s in sims)
    assert rollout_state(driver) == "paused"

    # The device's history: both attempts, with the first one's reason code.
    driver.get(f"{dash.url}/ui/devices/{flaky[0].device_id}")
    rows = css(driver, "#deployments tr[data-deployment-id]")
    history = " ".join(r.text for r in rows)
    assert len(rows) == 3, history  # 1.0.0, then 1.1.0 twice
    assert "download_failed" in history and "committed" in history
    assert "download_failed" in " ".join(c.text for c in css(driver, "#status-events td.reason"))
    shots.take(driver, "device")

    # Roll back: every device returns to 1.0.0, and the page says so.
    driver.get(f"{dash.url}/ui/rollouts/{second}")
    confirm(driver, "rollback", "roll back from the dashboard test")
    wait_for(driver, lambda d: rollout_state(d) == "rolled_back", 30, "rolled back")
    wait_for(driver, lambda _d: all(s.models["digits"].version == "1.0.0" for s in sims), 60, "all on 1.0.0")
    assert not css(driver, "#action-rollback")  # a rolled-back rollout offers no second rollback

    # The timeline links to the audit log, and the audit entry back to the rollout.
    links = css(driver, "#timeline li[data-audit-id] a.audit-link")
    assert links, "empty timeline"
    links[-1].click()
    wait_for(driver, lambda d: css(d, "#audit-entry"), 15, "the audit entry")
    back = driver.find_element("css selector", "#audit-entry a.rollout-link, a.rollout-link")
    assert str(back.get_attribute("href")).endswith(f"/ui/rollouts/{second}")

    # The other main pages, each shown once with this fleet in it.
    driver.get(f"{dash.url}/ui/rollouts")
    assert {r.get_attribute("data-rollout-id") for r in css(driver, "#rollouts-table tr[data-rollout-id]")} >= {
        first,
        second,
    }
    shots.take(driver, "rollouts")
    driver.get(f"{dash.url}/ui/devices?labels=tag={tag}")
    assert {r.get_attribute("data-device-id") for r in css(driver, "#devices-table tr[data-device-id]")} == {
        s.device_id for s in dash.sims
    }
    shots.take(driver, "devices")
    driver.get(f"{dash.url}/ui/releases")
    assert {r.get_attribute("data-release-id") for r in css(driver, "#releases-table tr[data-release-id]")} >= {
        base,
        new,
    }
    shots.take(driver, "releases")
    driver.get(f"{dash.url}/ui/releases/{new}")
    assert css(driver, "section.bundle[data-profile=x86]")
    shots.take(driver, "release")
    driver.get(f"{dash.url}/ui/audit")
    assert css(driver, "#audit-table tr[data-audit-id]")
    shots.take(driver, "audit")
    assert off_host_requests(requested_urls(driver)) == []
    assert console_errors(driver) == []


def test_the_drifted_feature_stands_out_on_the_telemetry_page(
    dash: Dash, open_browser: Callable[[], Chrome], shots: Screenshots
) -> None:
    tag = f"d{uuid.uuid4().hex[:6]}"
    release = dash.publish("1.0.0")
    sims = dash.devices(3, tag)
    for sim in sims:
        sim.connect()
    rid = dash.rollout(release, tag, stages=[{"percent": 100}], start=True)
    driver = open_browser()
    dash.sign_in(driver, ADMIN_TOKEN)
    wait_for(driver, lambda _d: dash.status(rid)["state"] == "completed", 60, "the release installed")
    now = datetime.now(UTC)
    for sim in sims:
        for k in range(6):  # the last half hour, one window per 5-minute column
            send_telemetry(sim, requests=2000, shifted=2, end=now - timedelta(minutes=5 * k), latency_bucket=4 + k % 3)

    def drifted(d: WebDriver) -> list[str] | None:
        d.get(f"{dash.url}/ui/telemetry?model=digits&hours=1")
        rows = css(d, "#drift-heatmap tr[data-feature]")
        hot = [str(r.get_attribute("data-feature")) for r in rows if css(r, "td.heat.lvl-drift")]
        return hot or None

    hot = wait_for(driver, drifted, 60, "a drifted feature in the heat map")
    rows = {str(r.get_attribute("data-feature")): r for r in css(driver, "#drift-heatmap tr[data-feature]")}
    assert len(rows) == 4 and len(hot) == 1, (sorted(rows), hot)
    (name,) = hot
    assert sorted(rows).index(name) == 2, (sorted(rows), name)  # feature 2 of input x, the one shifted
    for other, row in rows.items():
        if other != name:
            assert css(row, "td.heat.lvl-stable") and not css(row, "td.heat.lvl-drift"), other
    assert css(driver, "#latency-chart path[data-series]")
    driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});", driver.find_element("css selector", "#drift-heatmap")
    )
    shots.take(driver, "telemetry")


def test_a_viewer_sees_no_action_and_its_forged_post_is_refused(dash: Dash, open_browser: Callable[[], Chrome]) -> None:
    tag = f"v{uuid.uuid4().hex[:6]}"
    release = dash.publish("1.0.0")
    dash.devices(2, tag)  # never connected: the rollout waits for them
    rid = dash.rollout(release, tag, stages=[{"percent": 100}], start=True)
    dash.api("POST", f"/api/v1/rollouts/{rid}/pause")
    admin, viewer = open_browser(), open_browser()
    dash.sign_in(admin, ADMIN_TOKEN)
    dash.sign_in(viewer, dash.token("viewer"))
    assert viewer.find_element("css selector", "#whoami").get_attribute("data-role") == "viewer"
    for driver in (admin, viewer):
        driver.get(f"{dash.url}/ui/rollouts/{rid}")
    assert css(admin, "#action-resume") and css(admin, "#action-abort") and css(admin, "#action-rollback")
    assert css(viewer, "#actions a, #actions button, [id^=action-]") == []
    viewer.get(f"{dash.url}/ui/devices?labels=tag={tag}")
    assert css(viewer, "#devices-table tr[data-device-id]")
    assert css(viewer, "#bulk-label-submit") == [] and css(viewer, "input.device-select") == []

    cookie, csrf = session_of(viewer)
    body = {"csrf": csrf, "reason": "forged"}
    refused = post_form(dash, f"/ui/rollouts/{rid}/abort", cookie, body)
    assert refused.status_code == 403, refused.text[:500]
    labels = {"csrf": csrf, "device_ids": f"{tag}-x86-0", "key": "forged", "value": "yes", "op": "set"}
    assert post_form(dash, "/ui/devices/labels", cookie, labels).status_code == 403
    assert "forged" not in dash.api("GET", f"/api/v1/devices/{tag}-x86-0")["labels"]
    assert dash.status(rid)["state"] == "paused"

    admin_cookie, admin_csrf = session_of(admin)
    assert post_form(dash, f"/ui/rollouts/{rid}/abort", admin_cookie, {"reason": "no csrf"}).status_code == 403
    wrong = {"csrf": csrf, "reason": "the viewer's csrf token"}
    assert post_form(dash, f"/ui/rollouts/{rid}/abort", admin_cookie, wrong).status_code == 403
    assert post_form(dash, f"/ui/rollouts/{rid}/abort", None, body).status_code in (303, 401, 403)
    assert dash.status(rid)["state"] == "paused"
    allowed = post_form(dash, f"/ui/rollouts/{rid}/abort", admin_cookie, {"csrf": admin_csrf, "reason": "admin"})
    assert allowed.status_code == 303, allowed.text[:500]  # the same POST with the admin's session goes through
    assert dash.status(rid)["state"] == "aborted"


def test_api_docs_render_with_the_network_cut(
    dash: Dash, open_browser: Callable[[], Chrome], shots: Screenshots
) -> None:
    driver = open_browser()
    for path, ready in (("/docs", ".swagger-ui .info .title"), ("/redoc", "redoc, [class*=api-content]")):
        resp = httpx.get(f"{dash.url}{path}", timeout=10)
        assert resp.status_code == 200
        policy = resp.headers.get("content-security-policy", "")
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy, policy
        assert not EXTERNAL.findall(resp.text), EXTERNAL.findall(resp.text)
        driver.get(f"{dash.url}{path}")

        def rendered(d: WebDriver, sel: str = ready) -> list[Any]:
            return [e for e in css(d, sel) if e.text.strip()]

        wait_for(driver, rendered, 30, f"{path} rendered")
        assert "edgeota" in driver.find_element("tag name", "body").text.lower()
        blocked: list[str] = []
        urls = requested_urls(driver, blocked)
        assert urls and off_host_requests(urls) == [], urls
        if blocked:  # refused by the page's policy, so never sent: said, not failed
            print(f"{path}: requests refused by the Content-Security-Policy: {blocked}")
        # A policy violation is a failure (an own asset or inline script the page needs, refused), except a load of
        # an outside URL: that one the policy stopped from leaving the machine, as it should.
        violations = [m for m in console_errors(driver) if "Content Security Policy" in m]
        outward = [m for m in violations if off_host_requests(LOADING.findall(m))]
        assert [m for m in violations if m not in outward] == [], violations
        shots.take(driver, path.strip("/"))
