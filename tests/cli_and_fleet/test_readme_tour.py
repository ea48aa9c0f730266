"""The README's "A short tour", run as written: the commands are read from the README's tour block, so the test
fails when the README drifts from what the CLI does.

Real processes throughout: every ``edgeota`` line is the installed CLI in a subprocess (in one working folder,
so the tour's relative paths ``keys/``, ``dist/``, ``agent.toml``, ``mosquitto/`` and ``./edgeota-data`` hold),
``server run`` and ``agent run`` are long-running children, and the broker is a real Mosquitto of the test's own.

What the test substitutes, and nothing else:

- ``model.onnx``, ``calib.npz``, ``eval.npz``: a small digits classifier and its data, written before the tour.
- ``...`` in an ``export``: a fresh secret per variable; ``EDGEOTA_TOKEN=...`` is the admin token (as the README
  says for the tour).
- ``http://127.0.0.1:8080``: the server's URL on a free port (``server run`` gets ``--port``), and the server
  gets ``EDGEOTA_SERVER_MQTT_PORT`` for the test's broker (the tour assumes one on 127.0.0.1:1883).
- The broker runs with anonymous access until ``broker config`` has written ``mosquitto/edgeota.conf``; then it
  restarts on the same port with that file included ("include ..., reload"), as the test's user (the files are
  0600, so Mosquitto must not drop to its own user).
- ``agent run`` gets ``EDGEOTA_AGENT_STATE_DIR=agent-state`` and short heartbeat, trial and telemetry windows
  (the defaults are minutes); ``STATE_DIR`` is that folder.
- ``REL_ID`` and ``ROLLOUT_ID``: the ids ``release publish`` and ``rollout create`` printed; ``dist/*.bundle.tar``
  is expanded as a shell would; the soak of each ``--stage P%:SOAK`` is 1 s.
- ``curl --unix-socket SOCK URL``: the same GET over the Unix socket, in Python.

Besides the tour, the test sends a few inference requests to the agent's socket before ``telemetry summary`` and
waits until the server has their telemetry, so that the summary has something to show.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_for_port

# Generous: on a loaded 2-core machine packaging and the server's start take several times their usual time.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
EDGEOTA = str(Path(sys.executable).with_name("edgeota"))
TOUR_HEADING = "## A short tour"
README_URL = "http://127.0.0.1:8080"
AGENT_ENV = {
    "EDGEOTA_AGENT_STATE_DIR": "agent-state",
    "EDGEOTA_AGENT_HEARTBEAT_SECONDS": "2",
    "EDGEOTA_AGENT_TRIAL_SECONDS": "2",
    "EDGEOTA_AGENT_TELEMETRY_WINDOW_SECONDS": "2",
    "EDGEOTA_AGENT_SAMPLE_RATE": "1",
}


def tour_lines(readme: Path = README) -> list[list[str]]:
    """The commands of the README's tour block, continuation lines joined and comments dropped."""
    section = readme.read_text(encoding="utf-8").split(TOUR_HEADING, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines: list[list[str]] = []
    pending = ""
    for raw in block.splitlines():
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + raw, comments=True)
        pending = ""
        if words:
            lines.append(words)
    return lines


def test_tour_block_is_found_and_covers_the_whole_loop() -> None:
    """The parser itself: the tour names every step the test walks (a README without them fails here first)."""
    heads = [" ".join(w[:3]) for w in tour_lines()]
    for step in (
        "edgeota keys generate",
        "edgeota profiles list",
        "edgeota package model.onnx",
        "edgeota bundle verify",
        "edgeota server run",
        "edgeota release publish",
        "edgeota device provision",
        "edgeota broker config",
        "edgeota agent run",
        "edgeota rollout create",
        "edgeota rollout status",
        "edgeota telemetry summary",
    ):
        assert any(h.startswith(step) for h in heads), f"the README's tour has no `{step}`"


@dataclass
class Tour:
    """The state of one walk through the tour."""

    cwd: Path
    env: dict[str, str]
    broker_port: int
    server_port: int
    ids: dict[str, str] = field(default_factory=dict)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    broker: subprocess.Popen[bytes] | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def state_dir(self) -> Path:
        return self.cwd / AGENT_ENV["EDGEOTA_AGENT_STATE_DIR"]

    def start_broker(self, include: Path | None = None) -> None:
        """Mosquitto on ``broker_port``: anonymous, or with ``include`` (what ``broker config`` wrote)."""
        self.stop_broker()
        conf = self.cwd / "mosquitto-test.conf"
        # The generated files are 0600 and owned by the test's user: keep Mosquitto from dropping to its own user.
        lines = [f"listener {self.broker_port} 127.0.0.1", f"user {getpass.getuser()}"]
        lines += [include.read_text()] if include is not None else ["allow_anonymous true"]
        conf.write_text("\n".join(lines) + "\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = open(self.cwd / "mosquitto.log", "ab")  # noqa: SIM115 - the broker writes it while it runs
        self.broker = subprocess.Popen([exe, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.broker_port)

    def stop_broker(self) -> None:
        if self.broker is not None and self.broker.poll() is None:
            self.broker.terminate()
            self.broker.wait(timeout=10)

    def background(self, argv: list[str], env: dict[str, str], name: str) -> subprocess.Popen[bytes]:
        with open(self.cwd / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv, cwd=self.cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.children.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.cwd / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop_children(self) -> None:
        for proc in reversed(self.children):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self.stop_broker()


def wait_until(check: Callable[[], Any], timeout: float, what: str, tail: Callable[[], str] = str) -> Any:
    """``check()``'s first truthy value within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}: {tail()}")


def substitute(words: list[str], tour: Tour) -> list[str]:
    """A tour line with the documented substitutions (see the module docstring)."""
    out: list[str] = []
    for word in words:
        word = word.replace(README_URL, tour.url)
        for placeholder, value in tour.ids.items():
            word = word.replace(placeholder, value)
        word = word.replace("STATE_DIR", str(tour.state_dir))
        word = re.sub(r"^(\d+(?:\.\d+)?%):\d+(?:\.\d+)?$", r"\1:1", word)  # --stage 5%:600 -> 5%:1
        if any(c in word for c in "*?["):
            matches = sorted(glob.glob(word, root_dir=tour.cwd))
            assert matches, f"{word} matches no file"
            out.extend(matches)
            continue
        out.append(word)
    if out[:3] == ["edgeota", "server", "run"]:
        out += ["--port", str(tour.server_port)]
    return [EDGEOTA if w == "edgeota" else w for w in out]


def export(words: list[str], tour: Tour) -> None:
    for assignment in words[1:]:
        name, _, value = assignment.partition("=")
        if value == "...":
            value = tour.env["EDGEOTA_SERVER_ADMIN_TOKEN"] if name == "EDGEOTA_TOKEN" else secrets.token_urlsafe(24)
        tour.env[name] = value.replace(README_URL, tour.url)


def infer(tour: Tour, n: int) -> None:
    """``n`` requests to the agent's local inference endpoint (what an application on the device sends)."""
    transport = httpx.HTTPTransport(uds=str(tour.state_dir / "serve.sock"))
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    with httpx.Client(transport=transport, base_url="http://localhost", timeout=10) as client:
        for _ in range(n):
            resp = client.post("/v2/models/digits/infer", json=body)
            assert resp.status_code == 200, resp.text


def telemetry_requests(tour: Tour) -> int:
    headers = {"Authorization": f"Bearer {tour.env['EDGEOTA_TOKEN']}"}
    with httpx.Client(base_url=tour.url, headers=headers, timeout=30) as c:
        groups = c.get("/api/v1/telemetry/summary", params={"model_name": "digits"}).json().get("groups", [])
    return sum(int(g.get("requests", 0)) for g in groups)


def _up_or_exited(proc: subprocess.Popen[bytes], url: str) -> bool:
    return proc.poll() is not None or _healthy(url)


def run_line(words: list[str], tour: Tour) -> None:
    argv = substitute(words, tour)
    if words[0] == "curl":
        sock = argv[argv.index("--unix-socket") + 1]
        path = "/" + argv[-1].split("/", 1)[1]
        transport = httpx.HTTPTransport(uds=sock)
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=10) as client:
            resp = client.get(path)
        assert resp.status_code == 200 and resp.json()["name"] == "digits", resp.text
        return
    assert words[0] == "edgeota", f"the tour has a line the test does not know: {words}"
    if words[1:3] == ["server", "run"]:
        for attempt in range(3):
            env = {**tour.env, "EDGEOTA_SERVER_MQTT_PORT": str(tour.broker_port)}
            proc = tour.background(argv, env, "server")
            wait_until(partial(_up_or_exited, proc, tour.url), 90, "the server", lambda: tour.log("server"))
            if proc.poll() is None:
                return
            # The free port was taken by another process between choosing it and binding it: choose again.
            if "address already in use" not in tour.log("server") or attempt == 2:
                break
            old_url = tour.url
            tour.server_port = free_port()
            tour.env = {k: v.replace(old_url, tour.url) for k, v in tour.env.items()}
            argv = substitute(words, tour)
        assert proc.poll() is None, tour.log("server")
        return
    if words[1:3] == ["agent", "run"]:
        env = {k: v for k, v in tour.env.items() if not k.startswith("EDGEOTA_")} | AGENT_ENV
        proc = tour.background(argv, env, "agent")
        wait_until(
            lambda: proc.poll() is not None or (tour.state_dir / "serve.sock").exists(),
            90,
            "the agent's socket",
            lambda: tour.log("agent"),
        )
        assert proc.poll() is None, tour.log("agent")
        return
    if words[1:3] == ["telemetry", "summary"]:
        infer(tour, 20)
        wait_until(lambda: telemetry_requests(tour) >= 20, 90, "the agent's telemetry", lambda: tour.log("agent"))
    timeout = 240 if "--watch" in words else 120
    done = subprocess.run(argv, cwd=tour.cwd, env=tour.env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (words, done.stdout[-2000:], done.stderr[-2000:], tour.log("agent"))
    assert "Traceback" not in done.stderr, done.stderr
    tour.outputs[" ".join(words[1:3])] = done.stdout
    if words[1:3] == ["release", "publish"]:
        tour.ids["REL_ID"] = re.findall(r"release ([0-9a-f]{8,})", done.stdout)[0]
    elif words[1:3] == ["rollout", "create"]:
        tour.ids["ROLLOUT_ID"] = done.stdout.strip().splitlines()[-1]
    elif words[1:3] == ["broker", "config"]:
        out_dir = Path(argv[argv.index("--out") + 1])
        tour.start_broker(include=tour.cwd / out_dir / "edgeota.conf")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def tour(tmp_path: Path) -> Iterator[Tour]:
    from packager.examples.digits import build_digits_example

    example = build_digits_example(tmp_path / "example", arch="mlp")
    shutil.copy(example.model_path, tmp_path / "model.onnx")
    shutil.copy(example.calibration_path, tmp_path / "calib.npz")
    shutil.copy(example.eval_path, tmp_path / "eval.npz")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEOTA_")}
    walk = Tour(tmp_path, env, free_port(), free_port())
    walk.start_broker()
    try:
        yield walk
    finally:
        walk.stop_children()


def test_readme_tour_runs_as_written(tour: Tour) -> None:
    for words in tour_lines():
        if words[0] == "export":
            export(words, tour)
        else:
            run_line(words, tour)
    # What a reader of the tour would look at: it ended well.
    assert "digits 1.0.0" in tour.outputs["release publish"]
    assert "completed" in tour.outputs["rollout status"]
    summary = tour.outputs["telemetry summary"]
    assert "digits 1.0.0" in summary and "x86-avx2" in summary
    device = json_device(tour)
    assert [(m["model_name"], m["version"]) for m in device["models"]] == [("digits", "1.0.0")]
    # ... and on the device, the agent's own view says the same (agent status --output json).
    agent_env = {k: v for k, v in tour.env.items() if not k.startswith("EDGEOTA_")} | AGENT_ENV
    argv = [EDGEOTA, "agent", "status", "--config", "agent.toml", "-o", "json"]
    status = subprocess.run(argv, cwd=tour.cwd, env=agent_env, capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    local = json.loads(status.stdout)
    assert (local["model_name"], local["version"], local["last_deployment"]["state"]) == (
        "digits",
        "1.0.0",
        "committed",
    )


def json_device(tour: Tour) -> dict[str, Any]:
    argv = [EDGEOTA, "device", "list", "--output", "json"]
    listed = subprocess.run(argv, cwd=tour.cwd, env=tour.env, capture_output=True, text=True, timeout=60, check=True)
    (device_id,) = [d["device_id"] for d in json.loads(listed.stdout)]
    argv = [EDGEOTA, "device", "show", device_id, "-o", "json"]
    shown = subprocess.run(argv, cwd=tour.cwd, env=tour.env, capture_output=True, text=True, timeout=60, check=True)
    out: dict[str, Any] = json.loads(shown.stdout)
    return out
