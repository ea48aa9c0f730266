"""Start child processes, wait until they are ready, and always tear them down.

A :class:`Supervisor` owns every process it starts. Guarantees:

- each child runs in its own session and process group, so a terminal's Ctrl-C reaches only the
  parent, which then stops the children in order (newest first): SIGTERM to the group, then SIGKILL
  after a grace period;
- on Linux each child also gets ``PR_SET_PDEATHSIG`` (SIGTERM), so even a parent killed with
  SIGKILL does not leave its direct children running;
- leaving the ``with`` block normally, on an exception, on SIGINT (KeyboardInterrupt) or on SIGTERM
  (turned into :class:`Terminated` by :func:`signals_raise`) stops every child still alive.

Errors: :class:`ProcessError` when a child cannot start, exits before it is ready, or is not ready
in time; its message includes the tail of the child's log.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.states import ReasonCode

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ProcessError(EdgeotaError):
    """A supervised child process failed to start or to become ready."""

    default_reason = ReasonCode.INTERNAL_ERROR


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM while :func:`signals_raise` is active."""


def _load_prctl() -> Callable[[int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[[int, int], int] = libc.prctl
    return prctl


_PRCTL = _load_prctl()  # loaded before any fork: the pre-exec hook must not import or allocate much


def _child_setup() -> None:
    """Runs in the child between fork and exec: die with the parent."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    """One supervised process. ``log_path`` holds its stdout and stderr."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log ('' when there is none)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the child's process group, SIGKILL it after ``grace`` seconds; return the exit code."""
        if self.popen.poll() is None:
            _signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log_event(log, "child_killed", child=self.name, pid=self.pid, level=logging.WARNING)
                _signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        # Grandchildren left in the group (the child exited but they did not) go too.
        _signal_group(self.popen.pid, signal.SIGKILL)
        return self.popen.returncode


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Supervisor:
    """Owns child processes; a context manager that stops them all on exit.

    ``log_dir``: where each child's output goes (``<name>.log``); ``None`` discards it.
    """

    log_dir: Path | None = None
    grace: float = 5.0
    children: list[Child] = field(default_factory=list)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        inherit_env: bool = True,
    ) -> Child:
        """Start ``argv`` in its own process group; ``env`` is added to (or replaces) the environment.

        Raises:
            ProcessError: the executable cannot be started.
        """
        full_env = {**os.environ, **(env or {})} if inherit_env else dict(env or {})
        log_path: Path | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{name}.log"
        out = log_path.open("ab") if log_path else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(
                list(argv),
                env=full_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        except OSError as exc:
            raise ProcessError(f"cannot start {name} ({argv[0]}): {exc.strerror or exc}") from exc
        finally:
            if not isinstance(out, int):
                out.close()
        child = Child(name=name, argv=list(argv), popen=popen, log_path=log_path)
        self.children.append(child)
        log_event(log, "child_started", child=name, pid=popen.pid)
        return child

    def wait_port(self, child: Child, host: str, port: int, timeout: float = 20.0) -> None:
        """Return once ``host:port`` accepts TCP connections.

        Raises:
            ProcessError: the child exited first, or nothing listened within ``timeout`` seconds.
        """
        self._wait(child, lambda: _port_open(host, port), f"port {host}:{port}", timeout)

    def wait_http(self, child: Child, url: str, timeout: float = 30.0) -> None:
        """Return once GET ``url`` answers 2xx (e.g. ``http://127.0.0.1:8080/healthz``).

        Raises:
            ProcessError: the child exited first, or ``url`` was not healthy within ``timeout`` seconds.
        """
        self._wait(child, lambda: _http_ok(url), url, timeout)

    def _wait(self, child: Child, probe: Callable[[], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise ProcessError(
                    f"{child.name} exited with code {child.popen.returncode} before {what} was ready"
                    + _tail_suffix(child)
                )
            if probe():
                log_event(log, "child_ready", child=child.name, pid=child.pid, probe=what)
                return
            time.sleep(0.1)
        raise ProcessError(f"{child.name} not ready: {what} after {timeout:.0f}s" + _tail_suffix(child))

    def stop(self, child: Child) -> int | None:
        """Stop one child (see :meth:`Child.stop`) and forget it."""
        code = child.stop(self.grace)
        if child in self.children:
            self.children.remove(child)
        log_event(log, "child_stopped", child=child.name, pid=child.pid, code=code)
        return code

    def stop_all(self) -> None:
        """Stop every child, newest first. Signals arriving meanwhile are deferred, never lost."""
        with _signals_deferred():
            for child in reversed(list(self.children)):
                self.stop(child)


def _tail_suffix(child: Child) -> str:
    tail = child.log_tail()
    return f"\n--- last lines of {child.log_path} ---\n{tail}" if tail else ""


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises :class:`Terminated`, SIGINT KeyboardInterrupt.

    Both unwind the stack, so every ``with Supervisor()`` on the way stops its children.
    """
    if not _in_main_thread():
        yield
        return
    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _raise_terminated),
        signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during cleanup so a second Ctrl-C cannot abandon half-stopped children."""
    if not _in_main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            # Deliver the first deferred signal now, with the original handlers back in place.
            signal.raise_signal(received[0])


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
