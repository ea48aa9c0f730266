"""``edgeota rollout create --strategy bandit`` and ``rollout status`` over a real server process."""

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
from .test_server_process import provision, publish

pytestmark = pytest.mark.integration


@pytest.fixture
def server(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, f"sqlite:///{tmp_path / 'cli.db'}", keys, mqtt_broker).running() as proc:
        yield proc


def _cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN, "COLUMNS": "160"}
    return subprocess.run([EDGEOTA, *args], env=env, capture_output=True, text=True, timeout=60)


def test_bandit_create_status_and_one_line_errors(server: ServerProcess, make_bundle: BundleFactory) -> None:
    provision(server, 4, "cliband")
    a = publish(server, make_bundle("1.0.0", "x86"))["release_id"]
    b = publish(server, make_bundle("1.1.0", "x86"))["release_id"]
    common = ["rollout", "create", "--strategy", "bandit", "--release", a, "--release", b, "--label", "tag=cliband"]
    knobs = ["--bandit-floor", "0.2", "--bandit-interval", "5", "--bandit-max-moves", "1", "--bandit-seed", "3"]
    dry = _cli(server, *common, *knobs, "--dry-run", "-o", "json")
    assert dry.returncode == 0, dry.stderr
    preview = json.loads(dry.stdout)
    assert preview["eligible"] == 4 and [len(arm["devices"]) for arm in preview["arms"]] == [2, 2]
    table = _cli(server, *common, *knobs, "--dry-run")
    assert table.returncode == 0 and "Bandit arms" in table.stdout, table.stderr
    created = _cli(server, *common, *knobs, "--bandit-until-stopped")
    assert created.returncode == 0, created.stderr
    rid = created.stdout.strip()
    status = server.api("GET", f"/api/v1/rollouts/{rid}")
    assert status["state"] == "draft" and status["plan"]["bandit"]["floor"] == 0.2
    assert status["plan"]["bandit"]["win_probability"] is None and status["plan"]["bandit"]["seed"] == 3
    assert [arm["version"] for arm in status["bandit"]["arms"]] == ["1.0.0", "1.1.0"]
    shown = _cli(server, "rollout", "status", rid)
    assert shown.returncode == 0, shown.stderr
    assert "bandit arms" in shown.stdout and "1.1.0" in shown.stdout and "active" in shown.stdout
    as_json = json.loads(_cli(server, "rollout", "status", rid, "-o", "json").stdout)
    assert as_json["bandit"]["config"]["max_moves"] == 1

    for args, words in (
        ([*common[:6], "--label", "tag=cliband"], "two or more releases"),
        ([*common, "--bandit-floor", "0.7"], "floor"),
        (["rollout", "create", "--release", a, "--release", b], "arms apply only to strategy bandit"),
        ([*common, "--release", "missing"], "release missing not found"),
    ):
        bad = _cli(server, *args)
        assert bad.returncode != 0 and bad.stdout == ""
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], bad.stderr
        assert "Traceback" not in bad.stderr
