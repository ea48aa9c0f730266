"""The CLI commands of this package: bad input gives one `error:` line and a non-zero exit, never a traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port

from .helpers import port_free

CLI = [sys.executable, "-m", "edgeota.cli"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fleet", "simulate", "--profiles", " , ", "--server", "http://127.0.0.1:1", "--token", "t"], "at least one"),
        (
            ["fleet", "simulate", "--profiles", "rpi4", "--server", "http://x", "--token", "t", "--faults", "meteor:1"],
            "unknown kind 'meteor'",
        ),
        (
            [
                "fleet",
                "simulate",
                "--profiles",
                "rpi4",
                "--server",
                "http://x",
                "--token",
                "t",
                "--agent-setting",
                "oops",
            ],
            "not KEY=VALUE",
        ),
        (
            ["fleet", "simulate", "--profiles", "rpi4", "--server", "http://127.0.0.1:1", "--token", "t"],
            "cannot reach the server",
        ),
        (["embedded-broker", "run", "--kind", "rabbit"], "unknown broker kind 'rabbit'"),
        (["demo", "--broker", "rabbit"], "unknown broker 'rabbit'"),
    ],
)
def test_bad_input_is_one_error_line(args: list[str], message: str, tmp_path: Path) -> None:
    if args[0] == "fleet":
        args = [*args, "--workdir", str(tmp_path / "fleet")]
    result = _run(*args)
    assert result.returncode != 0
    assert "error: " in result.stderr and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_demo_refuses_a_foreign_workdir(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = _run("demo", "--workdir", str(tmp_path), "--devices", "3")
    assert result.returncode == 2
    assert "not made by edgeota" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.integration
def test_embedded_broker_runs_until_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "embedded-broker", "run", "--kind", "amqtt", "--port", str(port), "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the broker accepts connections
        assert f"amqtt listening on 127.0.0.1:{port}" in first
        wait_for_port("127.0.0.1", port, timeout=5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert port_free(port)
