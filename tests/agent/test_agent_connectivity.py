"""An agent says when it cannot reach its broker or its server, refuses a server URL without a scheme, and tells
a second agent with the same device id apart from a flaky network (real agent processes, real Mosquitto)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from device_agent.settings import AgentConfig
from device_agent.transport.status import (
    FIRST_BACKOFF_SECONDS,
    SESSION_TAKEN_OVER,
    SHORT_LIVED_LIMIT,
    TakeoverDetector,
)
from edgeota_contract.errors import ContractError
from tests.conftest import Broker, free_port
from tests.server.procs import agent_process, wait_for_agent

from .conftest import BundleServer, Keys, write_config

STATUS = [sys.executable, "-m", "edgeota.cli", "agent", "status", "--config"]


def events(log: Path, name: str) -> list[dict[str, object]]:
    """The structured log lines of ``log`` whose event is ``name``."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if f'"event": "{name}"' in line:
            out.append(json.loads(line[line.index("{") :]))
    return out


def status(config: Path) -> str:
    done = subprocess.run([*STATUS, str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def status_with(config: Path, *needles: str) -> str | None:
    """``agent status`` output once it shows every one of ``needles`` (else None: ask again)."""
    shown = status(config)
    return shown if all(n in shown for n in needles) else None


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "localhost:8080", "ota.example/api", "ftp://ota.example"])
def test_a_server_url_without_an_http_scheme_is_refused_at_load(tmp_path: Path, keys: Keys, url: str) -> None:
    config = write_config(tmp_path, keys, url)
    with pytest.raises(ContractError, match=r"\[server\] url .* is not an http\(s\) URL"):
        AgentConfig.load(config)


def test_a_broker_host_written_as_a_url_is_refused_at_load(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, "http://127.0.0.1:8080")
    config.write_text(config.read_text().replace('host = "127.0.0.1"', 'host = "mqtt://127.0.0.1"'))
    with pytest.raises(ContractError, match=r"\[mqtt\] host 'mqtt://127.0.0.1' must be a host name"):
        AgentConfig.load(config)


@pytest.mark.integration
def test_agent_run_with_a_schemeless_url_exits_with_one_line(tmp_path: Path, keys: Keys) -> None:
    config = write_config(tmp_path, keys, "127.0.0.1:8080")
    run = subprocess.run(
        [sys.executable, "-m", "edgeota.cli", "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert run.stderr.startswith("error: [server] url '127.0.0.1:8080' is not an http(s) URL")
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


# ------------------------------------------------------------------ unreachable broker and server


@pytest.mark.integration
def test_an_unreachable_broker_is_reported_within_seconds(tmp_path: Path, keys: Keys, server: BundleServer) -> None:
    closed = free_port()  # nothing listens there
    config = write_config(tmp_path, keys, server.url, device_id=f"unreach-{uuid.uuid4().hex[:8]}", mqtt_port=closed)
    log = config.with_suffix(".log")
    with agent_process(config) as proc:
        # the first attempt fails at once and each retry says why (paho retries after 1 s, 2 s, ...)
        failed = wait_for_agent(lambda: len(events(log, "mqtt_unreachable")) >= 2, 20, "two retries", proc, log)
        assert failed
        lines = events(log, "mqtt_unreachable")
        assert all("Connection refused" in str(e["reason"]) and e["broker"] == f"127.0.0.1:{closed}" for e in lines)
        assert [e["attempt"] for e in lines[:2]] == [1, 2]
        assert all(e["level"] == "warning" for e in lines)
        shown = status(config)
        assert "broker:         unreachable since" in shown and f"cannot reach broker 127.0.0.1:{closed}" in shown
        assert "Connection refused" in shown
        # the MQTT 5 probe does not give up on MQTT 5 for a broker that never answered at all
        assert not events(log, "mqtt_fallback_311")
    assert "no agent running" in status(config)


@pytest.mark.integration
def test_an_unreachable_server_is_reported_within_seconds(tmp_path: Path, keys: Keys, mqtt_broker: Broker) -> None:
    closed = free_port()
    config = write_config(
        tmp_path,
        keys,
        f"http://127.0.0.1:{closed}",
        device_id=f"nosrv-{uuid.uuid4().hex[:8]}",
        mqtt_port=mqtt_broker.port,
        server_check_seconds=60,
    )
    log = config.with_suffix(".log")
    with agent_process(config) as proc:
        wait_for_agent(lambda: len(events(log, "server_unreachable")) >= 2, 20, "two failed server checks", proc, log)
        first, second = events(log, "server_unreachable")[:2]
        assert "Connection refused" in str(first["reason"]) and first["attempt"] == 1 and second["attempt"] == 2
        assert first["url"] == f"http://127.0.0.1:{closed}/healthz"
        shown = wait_for_agent(lambda: status_with(config, "broker:         connected"), 20, "mqtt", proc)
        assert "server:         unreachable since" in shown and "Connection refused" in shown


@pytest.mark.integration
def test_a_reachable_server_is_shown_as_such(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, server: BundleServer
) -> None:
    config = write_config(
        tmp_path,
        keys,
        server.url,
        device_id=f"srv-{uuid.uuid4().hex[:8]}",
        mqtt_port=mqtt_broker.port,
        server_check_seconds=60,
    )
    with agent_process(config) as proc:
        shown = wait_for_agent(
            lambda: status_with(config, "server:         reachable", "broker:         connected"),
            60,
            "both connections",
            proc,
            config.with_suffix(".log"),
        )
        assert "WARNING" not in shown
    paths = [r["path"] for r in server.requests]
    assert paths and set(paths) == {"/healthz"}  # only health checks (more than one when a slow check is retried)


# ------------------------------------------------------------------ a second agent with the same device id


def test_takeover_detector_rules() -> None:
    det = TakeoverDetector("d1")
    # MQTT 5: the broker's reason code is proof at once, however long the connection lasted
    det.connected(0.0)
    evidence = det.disconnected(100.0, SESSION_TAKEN_OVER, "Session taken over")
    assert evidence and "another agent seems to use device id d1" in evidence
    assert det.backoff == FIRST_BACKOFF_SECONDS
    det.connected(200.0)
    assert (
        det.disconnected(201.0, SESSION_TAKEN_OVER, "Session taken over") and det.backoff == 2 * FIRST_BACKOFF_SECONDS
    )
    # a connection that lasts, closed without that reason: a network fault, the backoff starts again
    det.connected(300.0)
    assert det.disconnected(400.0, 128, "Unspecified error") is None and det.backoff == 0
    # MQTT 3.1.1: only connections closed right after being accepted, several in a row
    for i in range(SHORT_LIVED_LIMIT - 1):
        det.connected(500.0 + 10 * i)
        assert det.disconnected(501.0 + 10 * i, 128, "Unspecified error") is None
    det.connected(600.0)
    assert "3 connections in a row" in str(det.disconnected(601.0, 128, "Unspecified error"))
    # a refused attempt (never accepted) is no evidence
    assert det.disconnected(700.0, 128, "Unspecified error") is None


@pytest.mark.integration
@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_a_second_agent_with_the_same_device_id_is_told_and_backs_off(
    tmp_path: Path, keys: Keys, mqtt_broker: Broker, server: BundleServer, protocol: str
) -> None:
    device_id = f"twin-{uuid.uuid4().hex[:8]}"
    configs = []
    for name in ("a", "b"):
        config = write_config(
            tmp_path / name, keys, server.url, device_id=device_id, mqtt_port=mqtt_broker.port, log_level="INFO"
        )
        config.write_text(config.read_text().replace('protocol = "auto"', f'protocol = "{protocol}"'))
        configs.append(config)
    logs = [c.with_suffix(".log") for c in configs]
    with agent_process(configs[0]) as first:
        wait_for_agent(lambda: events(logs[0], "mqtt_connected"), 20, "the first agent", first, logs[0])
        with agent_process(configs[1]) as second:
            told = wait_for_agent(
                lambda: [i for i in (0, 1) if events(logs[i], "mqtt_duplicate_device")],
                30,
                "a takeover",
                second,
                logs[1],
            )
            i = told[0]
            error = events(logs[i], "mqtt_duplicate_device")[0]
            assert error["level"] == "error" and f"another agent seems to use device id {device_id}" in str(
                error["detail"]
            )
            assert "another agent seems to use device id" in status(configs[i])
            # no fight every second: over the next 8 s the two connect a few times at most (without the backoff,
            # each took the connection back about once a second)
            before = sum(len(events(log, "mqtt_connected")) for log in logs)
            assert first.poll() is None and second.poll() is None
            time.sleep(8)
            after = sum(len(events(log, "mqtt_connected")) for log in logs)
            assert after - before <= 3, (before, after)
