"""The dashboard over real HTTP on a real server process with two API workers: a session made by one worker is
honoured by the other, CSRF is checked, and the docs assets come from the server itself."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import Broker

from .conftest import ADMIN, Keys
from .procs import EDGEOTA, ServerProcess


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found
    return found.group(1)


@pytest.mark.integration
def test_dashboard_session_across_workers_over_http(
    tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker
) -> None:
    server = ServerProcess(tmp_path, db_url, keys, mqtt_broker, workers=2)
    with server.running(), httpx.Client(base_url=server.url, timeout=10) as browser:
        login = browser.get("/ui/login")
        assert login.status_code == 200 and "frame-ancestors 'none'" in login.headers["content-security-policy"]
        signed = browser.post("/ui/login", data={"token": ADMIN, "csrf": _csrf(login.text), "next": "/ui/devices"})
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/devices"
        cookie = signed.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        # Many requests: both workers answer some of them, with the one session.
        for path in ["/ui/", "/ui/devices", "/ui/rollouts", "/ui/releases", "/ui/telemetry", "/ui/audit"] * 3:
            resp = browser.get(path)
            assert resp.status_code == 200, (path, resp.text[:300])
        page = browser.get("/ui/")
        assert browser.post("/ui/logout", data={"csrf": "forged"}).status_code == 403
        out = browser.post("/ui/logout", data={"csrf": _csrf(page.text)})
        assert out.status_code == 303
        assert browser.get("/ui/").status_code == 303
        # The CLI's retry-failed: a rollout that does not exist, or one that is not running, is a one-line error.
        env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN}
        missing = subprocess.run(
            [EDGEOTA, "rollout", "retry-failed", "nope"], env=env, capture_output=True, text=True, timeout=60
        )
        assert missing.returncode != 0 and missing.stderr.strip().startswith("error:"), missing.stderr
        assert len(missing.stderr.strip().splitlines()) == 1 and "not found" in missing.stderr
        docs = browser.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text.lower()
        assert browser.get("/ui/docs-assets/swagger-ui-bundle.js").status_code == 200
