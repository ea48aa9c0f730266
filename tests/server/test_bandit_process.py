"""A bandit rollout end to end: a real server process, real Mosquitto, five real ``edgeota agent run`` processes.

Two releases of the digits model: 1.1.0 (newer) and 1.0.0. The application calls each device's inference
endpoint and reports a reward for every answer through the agent's feedback call (agent -> MQTT -> server):
reward 1.0 with probability 0.9 for answers of 1.0.0, 0.2 for 1.1.0. The bandit (floor 0.1, one move per step)
starts 3 devices on 1.1.0 and 2 on 1.0.0 and moves devices to 1.0.0 until 1.1.0 keeps only its floor, one
device; the moved devices really serve 1.0.0 (a move to the older release goes as a server-signed rollback).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeota_contract.provisioning import DeviceProvisioning
from tests.agent.bundles import FEATURES, make_bundle, sample_inputs
from tests.conftest import Broker

from .conftest import Keys
from .procs import ServerProcess, agent_process, wait_for_agent
from .test_server_process import publish, rollout_state

pytestmark = pytest.mark.integration
PROFILE = "x86_64-avx2"
DEVICES = 5
GOOD, BAD = "1.0.0", "1.1.0"
REWARD_RATE = {GOOD: 0.9, BAD: 0.2}


def _bundle(path: Path, keys: Keys, version: str, seed: int) -> Path:
    make_bundle(path, keys.release, version=version, profile=PROFILE, seed=seed)
    return path


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    with ServerProcess(tmp_path, db_url, keys, mqtt_broker).running() as proc:
        yield proc


@pytest.fixture
def sockets() -> Iterator[Path]:
    """A short folder for the agents' endpoint sockets (a Unix socket path has ~100 bytes at most)."""
    folder = Path(tempfile.mkdtemp(prefix="edgeota-bandit-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _agent_config(server: ServerProcess, folder: Path, device_id: str, tag: str, sock: Path) -> Path:
    body = {"device_id": device_id, "hardware_profile": PROFILE, "labels": {"tag": tag}}
    toml = server.api("POST", "/api/v1/devices", json=body)["agent_toml"]
    prov = DeviceProvisioning.model_validate(tomllib.loads(toml))
    prov.agent.update(
        {
            "state_dir": str(folder / "state"),
            "serve_socket": str(sock),
            "telemetry_window_seconds": 1.0,
            "heartbeat_seconds": 2.0,
            "report_retry_seconds": 0.5,
            "trial_seconds": 0.3,
            "trial_requests": 0,
        }
    )
    folder.mkdir(parents=True)
    config = folder / "agent.toml"
    config.write_text(prov.to_toml())
    return config


def _arms(server: ServerProcess, rid: str) -> dict[str, dict[str, Any]]:
    status = rollout_state(server, rid)
    assert status["state"] == "running", status["detail"]
    return {a["version"]: a for a in status["bandit"]["arms"]}


def test_the_bandit_moves_allocation_toward_the_better_release(
    server: ServerProcess, keys: Keys, tmp_path: Path, sockets: Path
) -> None:
    bad = publish(server, _bundle(tmp_path / "bad.tar", keys, BAD, seed=5))["release_id"]
    good = publish(server, _bundle(tmp_path / "good.tar", keys, GOOD, seed=0))["release_id"]
    tag = f"bandit-{uuid.uuid4().hex[:8]}"
    devices = [f"{tag}-{i}" for i in range(DEVICES)]
    configs = {d: _agent_config(server, tmp_path / d, d, tag, sockets / f"{i}.sock") for i, d in enumerate(devices)}
    rng = random.Random(2026)
    x = sample_inputs(64, seed=3)
    with ExitStack() as stack:
        procs = {d: stack.enter_context(agent_process(configs[d])) for d in devices}
        apps = {
            d: stack.enter_context(
                httpx.Client(
                    transport=httpx.HTTPTransport(uds=str(sockets / f"{i}.sock")),
                    base_url="http://agent",
                    timeout=10,
                )
            )
            for i, d in enumerate(devices)
        }
        watch = procs[devices[0]]
        body = {
            "release_id": bad,
            "strategy": "bandit",
            "arms": [good],
            "selector": {"labels": {"tag": tag}},
            "gates": {"max_failure_rate": 0.5, "min_count_for_failure_rate": 2, "device_timeout_seconds": 60},
            "bandit": {
                "floor": 0.1,
                "interval_seconds": 1.0,
                "max_moves": 1,
                "draws": 1000,
                "seed": 17,
                "win_probability": None,
            },
            "start": True,
        }
        created = server.api("POST", "/api/v1/rollouts", json=body)
        rid = created["rollout_id"]
        first = {a["version"]: len(a["devices"]) for a in created["preview"]["arms"]}
        assert first == {BAD: 3, GOOD: 2}

        def placed() -> bool:
            return sum(int(a["committed"]) for a in _arms(server, rid).values()) == DEVICES

        wait_for_agent(placed, 60, "every device placed on an arm", watch, configs[devices[0]].with_suffix(".log"))
        served: dict[str, str] = {}

        def serve_and_reward() -> bool:
            """One request per device, its reward reported through the agent; done when the allocation settled."""
            for device, app in apps.items():
                row = x[rng.randrange(len(x))]
                req = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": row.tolist()}]}
                answer = app.post("/v2/models/digits/infer", json=req)
                if answer.status_code != 200:  # between two releases while it is moved: ask again next round
                    continue
                version = answer.json()["model_version"]
                served[device] = version
                reward = 1.0 if rng.random() < REWARD_RATE[version] else 0.0
                pid = answer.json()["parameters"]["prediction_id"]
                fb = app.post("/v2/models/digits/feedback", json={"prediction_id": pid, "reward": reward})
                assert fb.status_code == 202, fb.text
            arms = _arms(server, rid)
            return (arms[GOOD]["committed"], arms[BAD]["committed"]) == (DEVICES - 1, 1) and all(
                a["in_progress"] == 0 for a in arms.values()
            )

        wait_for_agent(serve_and_reward, 75, "the allocation to move toward 1.0.0", watch, interval=0.05)
        serve_and_reward()
        assert sorted(served.values()) == [GOOD] * (DEVICES - 1) + [BAD]  # the devices really serve it
        status = rollout_state(server, rid)
        arms = {a["version"]: a for a in status["bandit"]["arms"]}
        assert status["bandit"]["moved_by_steps"] == 2  # two devices moved, one per step (the cap)
        assert arms[GOOD]["prob_best"] > 0.95 and arms[GOOD]["posterior"]["mean"] > arms[BAD]["posterior"]["mean"]
        assert arms[GOOD]["rewards"] > 0 and arms[BAD]["rewards"] > 0
        assert arms[BAD]["target_share"] == pytest.approx(0.1, abs=0.02) and arms[BAD]["state"] == "active"
        entries = server.api("GET", "/api/v1/audit", params={"entity_id": rid, "action": "rollout.bandit.move"})
        moved = [m for e in entries for m in e["after"]["moves"]]
        assert len(moved) == 2 and all((m["from"], m["to"]) == (BAD, GOOD) for m in moved)
        for proc in procs.values():
            assert proc.poll() is None
