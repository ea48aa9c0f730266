"""The browser bench's own rules: a missing browser fails (never skips), and what counts as leaving the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import browser


def test_a_missing_browser_fails_with_the_command_that_installs_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(browser, "CHROMIUM", tmp_path / "chromium")
    with pytest.raises(pytest.fail.Exception, match=r"browser missing: .*chromium; run `make browser`"):
        browser.require_browser()
    with pytest.raises(pytest.fail.Exception):
        browser.start_browser()  # never reaches Selenium (whose manager would try to download a browser)


def test_requests_that_leave_the_machine_are_named() -> None:
    urls = [
        "http://127.0.0.1:8080/ui/static/dashboard.js",
        "http://localhost:8080/docs",
        "data:image/svg+xml;base64,AAAA",
        "blob:http://127.0.0.1:8080/1234",
        "https://cdn.jsdelivr.net/npm/swagger-ui-dist/swagger-ui.css",
        "ws://example.org/live",
        "//fonts.googleapis.com/css",
    ]
    assert browser.off_host_requests(urls) == [
        "https://cdn.jsdelivr.net/npm/swagger-ui-dist/swagger-ui.css",
        "ws://example.org/live",
        "//fonts.googleapis.com/css",
    ]


def test_screenshots_go_to_the_artifacts_folder_and_only_on_request_to_docs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(browser.ARTIFACTS_ENV, str(tmp_path / "artifacts"))
    monkeypatch.delenv(browser.UPDATE_DOCS_ENV, raising=False)
    shots = browser.Screenshots()
    assert shots.folder == tmp_path / "artifacts" / "dashboard" and shots.folder.is_dir()
    assert not shots.update_docs
    monkeypatch.setenv(browser.UPDATE_DOCS_ENV, "1")
    assert browser.Screenshots().update_docs
