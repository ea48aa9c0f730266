"""Headless Chromium for the dashboard tests: Debian's ``chromium`` driven by its ``chromedriver`` through Selenium.

The browser is never downloaded: the paths are fixed to what ``make browser`` installs (apt-get). A missing
browser is a test failure with the command that installs it, never a skip, so CI cannot pass without running
these tests. Every browser runs with the network cut except for loopback (``--host-resolver-rules`` resolves no
other host, ``--no-proxy-server``), and keeps Chrome's performance log so a test can list every request the page
made (:func:`off_host_requests`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, TimeoutException
from selenium.webdriver import Chrome
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
WINDOW = (1280, 860)
TRANSIENT = (StaleElementReferenceException, NoSuchElementException)
ROOT = Path(__file__).resolve().parents[2]
DOC_IMAGES = ROOT / "docs" / "images"
UPDATE_DOCS_ENV = "EDGEOTA_UPDATE_DOCS_IMAGES"
ARTIFACTS_ENV = "EDGEOTA_TEST_ARTIFACTS"


def require_browser() -> None:
    """Fail (never skip) when Debian's chromium or chromedriver is missing, naming the fix."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"browser missing: {', '.join(missing)}; run `make browser` as root "
            "(apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )


def chrome_options() -> webdriver.ChromeOptions:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI; Chromium's sandbox refuses root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-proxy-server",
        # The network cut: every host name but loopback resolves to nothing, so a page that reaches for a CDN
        # fails visibly (and the performance log shows the attempt).
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1 , EXCLUDE localhost",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return options


def start_browser() -> Chrome:
    """A new headless Chromium (fails the test when the browser is missing)."""
    require_browser()
    service = Service(executable_path=str(CHROMEDRIVER))  # a path given: Selenium Manager never runs
    driver = webdriver.Chrome(service=service, options=chrome_options())
    driver.set_page_load_timeout(30)
    return driver


def requested_urls(driver: Chrome, csp_blocked: list[str] | None = None) -> list[str]:
    """Every URL the browser sent a request for since the last call (the performance log is drained by reading it).

    A request the page's Content-Security-Policy refused never leaves the browser: it goes to ``csp_blocked``
    (when given) instead of the answer.
    """
    sent: list[tuple[str, str]] = []  # (request id, url)
    blocked: set[str] = set()
    for entry in driver.get_log("performance"):  # type: ignore[no-untyped-call]
        message = json.loads(entry["message"])["message"]
        method, params = message.get("method"), message.get("params", {})
        if method == "Network.requestWillBeSent":
            sent.append((str(params["requestId"]), str(params["request"]["url"])))
        elif method == "Network.webSocketCreated":
            sent.append((str(params["requestId"]), str(params["url"])))
        elif method == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(str(params["requestId"]))
    out = []
    for request_id, url in sent:
        if request_id not in blocked:
            out.append(url)
        elif csp_blocked is not None:
            csp_blocked.append(url)
    return out


def off_host_requests(urls: list[str]) -> list[str]:
    """The network requests among ``urls`` that would leave the machine (data:, blob: and loopback stay)."""
    out = []
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about", "chrome", "devtools"):
            continue
        if parts.hostname not in LOOPBACK:
            out.append(url)
    return out


def console_errors(driver: Chrome, expected: tuple[str, ...] = ("/favicon.ico ",)) -> list[str]:
    """Severe messages of the page's console since the last call (script errors, CSP refusals, failed loads),
    except those naming one of ``expected`` (by default the favicon the browser asks for on its own)."""
    logs: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    severe = [str(e["message"]) for e in logs if e.get("level") == "SEVERE"]
    return [m for m in severe if not any(x in m for x in expected)]


def wait_for(driver: WebDriver, check: Callable[[WebDriver], Any], timeout: float, what: str) -> Any:
    """``check(driver)``'s first truthy value within ``timeout`` s, else a failure naming ``what`` and the page."""
    try:
        # A page replaced mid-check (navigation, a live update redrawing a node) is checked again, not an error.
        return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=TRANSIENT).until(check)
    except TimeoutException:
        body = driver.find_element("tag name", "body").text[:1500]
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what} on {driver.current_url}:\n{body}"
        ) from None


def css(driver: WebDriver | WebElement, selector: str) -> list[WebElement]:
    return driver.find_elements("css selector", selector)


def page_name(driver: WebDriver) -> str:
    return str(driver.find_element("css selector", "body").get_attribute("data-page") or "")


class Screenshots:
    """PNG of a page saved as a test artifact; ``EDGEOTA_UPDATE_DOCS_IMAGES=1`` also refreshes the committed copy.

    Artifacts go to ``$EDGEOTA_TEST_ARTIFACTS/dashboard/`` (default ``test-artifacts/dashboard/`` at the repository
    root, ignored by git). Only the names in :data:`DOCS` are copied to ``docs/images/dashboard-<name>.png``,
    reduced to a 256-colour palette so the committed files stay small.
    """

    DOCS = frozenset({"overview", "rollout-halted", "devices", "telemetry"})

    def __init__(self, folder: Path | None = None) -> None:
        base = Path(os.environ[ARTIFACTS_ENV]) if os.environ.get(ARTIFACTS_ENV) else ROOT / "test-artifacts"
        self.folder = folder or base / "dashboard"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.update_docs = os.environ.get(UPDATE_DOCS_ENV) == "1"
        self.saved: list[Path] = []

    def take(self, driver: WebDriver, name: str) -> Path:
        path = self.folder / f"{name}.png"
        assert driver.save_screenshot(str(path)), f"screenshot {name} not saved"
        self.saved.append(path)
        if self.update_docs and name in self.DOCS:
            self._publish(path, DOC_IMAGES / f"dashboard-{name}.png")
        return path

    @staticmethod
    def _publish(source: Path, target: Path) -> None:
        from PIL import Image

        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(source) as image:
            small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            small.save(target, optimize=True)
        if target.stat().st_size > source.stat().st_size:  # the palette did not help: keep the original
            shutil.copyfile(source, target)
