"""The process supervisor: readiness, and no child left behind on exit, exception, SIGINT, SIGTERM or SIGKILL."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgeota.procs import ProcessError, Supervisor

from .helpers import children_of, pid_running, wait_gone

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
STUBBORN = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]

# A "demo parent": supervises two sleepers (one with a grandchild), prints their pids, then waits to be signalled.
PARENT = textwrap.dedent(
    """
    import sys, time
    from edgeota.procs import Supervisor, signals_raise
    SLEEP = [sys.executable, "-c", "import time; time.sleep(60)"]
    NEST = [sys.executable, "-c",
            "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            " print(p.pid, flush=True); time.sleep(60)"]
    with signals_raise(), Supervisor(grace=2) as sup:
        a = sup.start("a", SLEEP)
        b = sup.start("b", NEST)
        print(a.pid, b.pid, flush=True)
        time.sleep(60)
    """
)


def _start_parent(tmp_path: Path) -> tuple[subprocess.Popen[str], list[int]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True
    )
    assert parent.stdout is not None
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.5)  # let the nested child start its grandchild
    return parent, pids


def _grandchildren(child_pid: int) -> list[int]:
    return children_of(child_pid)


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_to_parent_leaves_no_child(sig: signal.Signals, tmp_path: Path) -> None:
    parent, pids = _start_parent(tmp_path)
    grand = _grandchildren(pids[1])
    try:
        assert all(pid_running(p) for p in pids)
        parent.send_signal(sig)
        parent.wait(timeout=15)
        for pid in pids:
            assert wait_gone(pid), f"child {pid} survived {sig.name}"
        if sig != signal.SIGKILL:  # SIGKILL: only direct children die with the parent (PDEATHSIG)
            for pid in grand:
                assert wait_gone(pid), f"grandchild {pid} survived {sig.name}"
    finally:
        for pid in pids + grand:
            if pid_running(pid):
                subprocess.run(["kill", "-9", str(pid)], check=False)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.integration
def test_exception_inside_block_stops_children(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), Supervisor() as sup:
        child = sup.start("sleeper", SLEEPER)
        raise RuntimeError("boom")
    assert wait_gone(child.pid)
    assert sup.children == []


@pytest.mark.integration
def test_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    with Supervisor(grace=0.5) as sup:
        child = sup.start("stubborn", STUBBORN)
        time.sleep(0.3)  # let it install its handler
    assert wait_gone(child.pid)
    assert child.popen.returncode == -signal.SIGKILL


@pytest.mark.integration
def test_wait_http_and_port(tmp_path: Path) -> None:
    from tests.conftest import free_port

    port = free_port()
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.start("http", [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path)
        sup.wait_port(child, "127.0.0.1", port, timeout=15)
        sup.wait_http(child, f"http://127.0.0.1:{port}/", timeout=15)
    assert wait_gone(child.pid)


@pytest.mark.integration
def test_child_exiting_before_ready_is_reported_with_its_log(tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.start("crash", [sys.executable, "-c", "import sys; print('bad config here'); sys.exit(3)"])
        with pytest.raises(ProcessError, match="exited with code 3") as err:
            sup.wait_port(child, "127.0.0.1", 1, timeout=10)
    assert "bad config here" in str(err.value)


@pytest.mark.integration
def test_not_ready_in_time(tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path) as sup:
        child = sup.start("sleeper", SLEEPER)
        with pytest.raises(ProcessError, match="not ready"):
            sup.wait_http(child, "http://127.0.0.1:1/healthz", timeout=0.5)
    assert wait_gone(child.pid)


def test_missing_executable_is_a_process_error(tmp_path: Path) -> None:
    with Supervisor() as sup, pytest.raises(ProcessError, match="cannot start"):
        sup.start("ghost", [str(tmp_path / "no-such-binary")])
