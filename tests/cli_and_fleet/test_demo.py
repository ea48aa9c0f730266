"""`edgeota demo --quick` end to end (real broker, server, packager and agents), and Ctrl-C in the middle of it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import children_of, pid_running, wait_gone

DEMO = [sys.executable, "-m", "edgeota.cli", "demo", "--devices", "6", "--quick"]


def _env() -> dict[str, str]:
    return {**os.environ, "COLUMNS": "120", "TERM": "dumb"}


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quick_demo_runs_the_whole_story(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [*DEMO, "--workdir", str(workdir)], capture_output=True, text=True, timeout=220, env=_env(), check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "demo finished as expected" in out
    assert "completed" in out and "rolled_back (gate_failed)" in out
    assert "failure rate" in out  # the gate that fired is named
    assert "/docs" in out
    assert (workdir / "server" / "edgeota.db").is_file()
    assert len(list((workdir / "fleet").iterdir())) == 6


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ctrl_c_mid_demo_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*DEMO, "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    seen: list[str] = []
    children: list[int] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            if "[5/7]" in line:  # broker, server and the fleet are up; a rollout is under way
                break
        else:
            raise AssertionError("demo ended early:\n" + "".join(seen))
        children = children_of(proc.pid)
        assert len(children) >= 2  # the broker and the server
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, "".join(seen) + rest
        assert "interrupted" in rest
        for pid in children:
            assert wait_gone(pid, 10), f"child {pid} outlived the demo"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in children:
            if pid_running(pid):
                os.kill(pid, signal.SIGKILL)
