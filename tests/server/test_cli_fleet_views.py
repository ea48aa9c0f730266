"""The fleet views of the CLI over a real server process: tables at 80 columns, --output json, rollout list,
rollout status (sections, gates, --watch exit codes) and device decommissioning with its rejections."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker

from .conftest import ADMIN, BundleFactory, Keys
from .procs import EDGEOTA, ServerProcess

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'views.db'}", keys, mqtt_broker)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.http.close()


def run(server: ServerProcess, *args: str, token: str = ADMIN, code: int = 0) -> subprocess.CompletedProcess[str]:
    """The real ``edgeota`` CLI, as a terminal of 80 columns would run it."""
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": token, "COLUMNS": "80"}
    result = subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, (args, result.stdout, result.stderr)
    return result


def assert_fits(text: str, width: int = 80) -> None:
    too_wide = [line for line in text.splitlines() if len(line) > width]
    assert not too_wide, too_wide


def line_of(text: str, start: str) -> str:
    """The line of a table that starts with ``start``."""
    return next(line for line in text.splitlines() if line.startswith(start))


def test_lists_status_and_watch_exit_codes(server: ServerProcess, make_bundle: BundleFactory) -> None:
    run(server, "release", "publish", str(make_bundle("1.0.0", "x86-avx2")))
    release_id = server.api("GET", "/api/v1/releases")[0]["release_id"]
    releases = run(server, "release", "list").stdout
    assert_fits(releases)
    assert "digits" in releases and "x86-avx2" in releases
    release = run(server, "release", "show", release_id).stdout
    assert_fits(release)
    assert f"release {release_id}" in release and "bundles" in release and "metrics" in release
    assert "e+" not in release  # sizes and metrics for people, never 2.68435e+08
    long_label = "site=" + "north-east-warehouse-" * 5
    for i in range(3):
        run(server, "device", "provision", "--profile", "x86-avx2", "--id", f"cam-{i}", "--label", long_label)

    listed = run(server, "device", "list").stdout
    assert_fits(listed)
    assert all(f"cam-{i}" in listed for i in range(3)) and "devices (3)" in listed
    as_json = json.loads(run(server, "device", "list", "--output", "json").stdout)
    assert [d["device_id"] for d in as_json] == ["cam-0", "cam-1", "cam-2"]
    assert [d["device_id"] for d in json.loads(run(server, "device", "list", "--json", "--limit", "1").stdout)] == [
        "cam-0"
    ]
    shown = run(server, "device", "show", "cam-0").stdout
    assert_fits(shown)
    assert "device cam-0" in shown and "profile" in shown and "latest deployments" in shown

    create = ["rollout", "create", "--release", release_id, "--stage", "1", "--stage", "100%", "--min-count", "2"]
    first = run(server, *create, "--start").stdout.strip()
    second = run(server, *create).stdout.strip()
    status = run(server, "rollout", "status", first).stdout
    assert_fits(status)
    assert f"rollout {first}" in status and "stage" in status and "targets" in status
    # Each gate with its state: nothing finished yet, so neither count gate has been judged.
    assert "not evaluated" in line_of(status, "failure rate") and "0 of 2" in line_of(status, "failure rate")
    assert "not evaluated" in line_of(status, "min devices") and "0 of 1" in line_of(status, "min devices")

    rows = json.loads(run(server, "rollout", "list", "-o", "json").stdout)
    assert {r["rollout_id"] for r in rows} == {first, second} and rows[0]["model_name"] == "digits"
    assert [
        r["rollout_id"] for r in json.loads(run(server, "rollout", "list", "--state", "draft", "-o", "json").stdout)
    ] == [second]
    assert json.loads(run(server, "rollout", "list", "--model", "other", "-o", "json").stdout) == []
    page = run(server, "rollout", "list", "--limit", "1").stdout
    assert_fits(page)
    assert "more may follow: --offset 1" in page

    # --watch ends with an exit code that says how the rollout ended.
    run(server, "rollout", "rollback", first)
    watched = run(server, "rollout", "status", first, "--watch", code=3)
    assert "rolled_back" in watched.stdout and "(exit 3)" in watched.stdout
    run(server, "rollout", "abort", second)
    assert json.loads(run(server, "rollout", "status", second, "--watch", "-o", "json", code=4).stdout)["state"] == (
        "aborted"
    )


def test_decommission_from_the_cli(server: ServerProcess, make_bundle: BundleFactory) -> None:
    run(server, "release", "publish", str(make_bundle("1.0.0", "x86-avx2")))
    run(server, "device", "provision", "--profile", "x86-avx2", "--id", "old-cam")
    run(server, "device", "provision", "--profile", "x86-avx2", "--id", "new-cam")
    viewer = run(server, "server", "token", "create", "--role", "viewer").stdout.strip()
    operator = run(server, "server", "token", "create", "--role", "operator").stdout.strip()

    denied = run(server, "device", "decommission", "old-cam", token=viewer, code=2)
    assert denied.stderr.startswith("error: ") and "403" in denied.stderr and len(denied.stderr.splitlines()) == 1
    missing = run(server, "device", "decommission", "no-cam", token=operator, code=2)
    assert "404" in missing.stderr and "Traceback" not in missing.stderr

    done = run(server, "device", "decommission", "old-cam", "--reason", "replaced", token=operator).stdout
    assert "device old-cam" in done and "decommissioned" in done
    again = run(server, "device", "decommission", "old-cam", token=operator, code=2)
    assert "409" in again.stderr and "decommissioned at" in again.stderr

    assert [d["device_id"] for d in json.loads(run(server, "device", "list", "-o", "json").stdout)] == ["new-cam"]
    everyone = run(server, "device", "list", "--all").stdout
    assert_fits(everyone)
    assert "old-cam" in everyone and "decommissioned" in everyone
    assert "decommissioned" in run(server, "device", "show", "old-cam").stdout
