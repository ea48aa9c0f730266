"""Data for retraining, end to end: real device agents serving the digits model upload samples in both streams to
a real server over HTTP; ``edgeota dataset export`` writes Parquet that pyarrow reads back (both databases).

Two agent processes (cohorts ``north`` and ``south``) install the packaged digits MLP through a rollout and are
fed the held-out digits (4 images a request); each keeps 20% of requests uniformly and every request with an
image under 0.7 confidence in the hard stream (at most 15 an hour). The export's rows are checked against the
model itself: every row's prediction and confidence are what ONNX Runtime gives for that row's input.

Run as a script (``python test_dataset_export_process.py agent.toml eval.npz``) it is the application process
that embeds the agent and sends the requests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

PROFILE = "x86-avx2"
THRESHOLD = 0.7
HARD_PER_HOUR = 15


def _drive(config: Path, eval_path: Path) -> None:
    """The application: the real agent, and 4 held-out digits every 20 ms while a model serves."""
    from device_agent.agent import Agent
    from device_agent.settings import AgentConfig
    from edgeota_contract.errors import EdgeotaError
    from edgeota_contract.logs import configure_logging

    cfg = AgentConfig.load(config)
    configure_logging(cfg.settings.log_level)
    images = np.load(eval_path)["input"].astype(np.float32)
    agent = Agent(cfg)
    agent.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    i = 0
    try:
        while not stop.wait(0.02):
            with contextlib.suppress(EdgeotaError):  # no model yet
                agent.predict({"input": images[i : i + 4].copy()})
                i = (i + 4) % (len(images) - 4)
    finally:
        agent.stop()


if __name__ == "__main__":
    _drive(Path(sys.argv[1]), Path(sys.argv[2]))
    sys.exit(0)


from edgeota_contract.provisioning import DeviceProvisioning  # noqa: E402
from edgeota_contract.signing import SigningKey, write_keypair  # noqa: E402  (the driver above needs none of this)
from tests.conftest import Broker  # noqa: E402

from .conftest import ADMIN, Keys  # noqa: E402
from .procs import EDGEOTA, ServerProcess  # noqa: E402
from .test_server_process import publish, rollout_state, wait_for  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The digits MLP, trained briefly (so some images are unsure) and packaged for one profile."""
    from packager.api import package_model
    from packager.examples.digits import build_digits_example
    from packager.request import PackageRequest

    root = tmp_path_factory.mktemp("digits")
    key = SigningKey.generate()
    _, pub = write_keypair(root / "keys" / "release.pem", key)
    example = build_digits_example(root / "model", arch="mlp", epochs=30)
    report = package_model(
        PackageRequest(
            model=example.model_path,
            profiles=[PROFILE],
            calibration=example.calibration_path,
            eval_data=example.eval_path,
            key=key,
            out_dir=root / "dist",
            name="digits",
            version="1.0.0",
            enforce_gates=False,
        )
    )
    result = report.results[PROFILE]
    assert result.bundle_path is not None, result
    return {"bundle": Path(result.bundle_path), "eval": example.eval_path, "keys": Keys(key, pub)}


@pytest.fixture
def server(tmp_path: Path, db_url: str, digits: dict[str, Any], mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, db_url, digits["keys"], mqtt_broker)
    with proc.running():
        yield proc


def _start_agent(server: ServerProcess, tmp_path: Path, cohort: str, eval_path: Path) -> tuple[str, Any]:
    device_id = f"{cohort}-{uuid.uuid4().hex[:6]}"
    body = {"device_id": device_id, "hardware_profile": PROFILE, "labels": {"cohort": cohort}}
    prov = DeviceProvisioning.model_validate(
        tomllib.loads(server.api("POST", "/api/v1/devices", json=body)["agent_toml"])
    )
    prov.agent.update(
        {
            "state_dir": str(tmp_path / device_id),
            "telemetry_window_seconds": 1.0,
            "heartbeat_seconds": 2.0,
            "trial_seconds": 2.0,
            "trial_requests": 20,
            "report_retry_seconds": 0.5,  # the retry tick also uploads samples
            "sample_rate": 0.2,
            "hard_sample_rate": 1.0,
            "hard_confidence_threshold": THRESHOLD,
            "hard_sample_max_per_hour": HARD_PER_HOUR,
        }
    )
    config = tmp_path / f"{device_id}.toml"
    config.write_text(prov.to_toml())
    with open(tmp_path / f"{device_id}.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, __file__, str(config), str(eval_path)], stdout=out, stderr=subprocess.STDOUT
        )
    return device_id, proc


def _stop(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def _softmax_max(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    return np.asarray(1.0 / np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))


def test_agents_upload_both_streams_and_the_export_reads_back(
    server: ServerProcess, digits: dict[str, Any], tmp_path: Path
) -> None:
    import onnxruntime as ort
    import pyarrow.dataset as pads

    from edgeota_contract.bundle import verify_bundle
    from edgeota_contract.signing import TrustedKeys

    started = datetime.now(UTC)
    release_id = publish(server, digits["bundle"])["release_id"]
    agents = dict(_start_agent(server, tmp_path, c, digits["eval"]) for c in ("north", "south"))
    try:
        body = {"release_id": release_id, "selector": {"device_ids": sorted(agents)}, "start": True}
        rid = server.api("POST", "/api/v1/rollouts", json=body)["rollout_id"]
        wait_for(lambda: rollout_state(server, rid)["state"] == "completed", timeout=120, what="digits installed")

        def enough() -> bool:
            counts = [int(server.api("GET", "/api/v1/samples", params={"device_id": d})["count"]) for d in agents]
            return min(counts) >= HARD_PER_HOUR + 25

        wait_for(enough, timeout=90, what="samples from both agents")
    finally:
        for proc in agents.values():
            _stop(proc)

    report = tmp_path / "drift.json"
    report.write_text(json.dumps({"feature": "input[12]", "verdict": "drift"}))
    out = tmp_path / "dataset"
    env = {**os.environ, "EDGEOTA_URL": server.url, "EDGEOTA_TOKEN": ADMIN}
    args = ["dataset", "export", "--model", "digits", "--out", str(out), "--trigger", "alert:drift-1"]
    result = subprocess.run(
        [EDGEOTA, *args, "--drift-report", str(report)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "of rows chosen by the model" in result.stdout

    manifest = json.loads((out / "_manifest.json").read_text())
    paths = [f["path"] for f in manifest["files"]]
    assert paths == sorted(f"release={release_id}/cohort={c}/part-0.parquet" for c in ("north", "south"))
    digest = hashlib.sha256()
    for p in paths:  # the stated order: as listed, i.e. sorted by path
        digest.update((out / p).read_bytes())
    assert manifest["digest"]["value"] == digest.hexdigest()
    assert manifest["trigger"] == "alert:drift-1" and manifest["drift_report"]["feature"] == "input[12]"
    assert manifest["parent_release"] == {"release_id": release_id, "model_name": "digits", "version": "1.0.0"}

    table = pads.dataset(out, format="parquet", partitioning="hive").to_table()
    assert [f["name"] for f in manifest["schema"]] == [n for n in table.column_names if n not in ("release", "cohort")]
    assert str(table.schema.field("input_input").type) == "list<element: float>"
    rows = table.to_pylist()
    assert len(rows) == manifest["counts"]["rows"] == sum(f["rows"] for f in manifest["files"])
    per_stream = manifest["counts"]["per_stream"]
    for stream in ("uniform", "hard"):
        mine = [r for r in rows if r["stream"] == stream]
        assert len(mine) == per_stream[stream]["rows"] > 0
        assert len({(r["device_id"], r["sample_sha256"]) for r in mine}) == per_stream[stream]["samples"]
    assert {r["cohort"] for r in rows} == {"north", "south"} and {r["release"] for r in rows} == {release_id}
    for device_id in agents:  # the hard budget held on each device
        hard = {r["sample_sha256"] for r in rows if r["stream"] == "hard" and r["device_id"] == device_id}
        assert 0 < len(hard) <= HARD_PER_HOUR
    assert all(started <= r["time"] <= datetime.now(UTC) for r in rows)

    # Every row is what the model said about that very input.
    model_dir = tmp_path / "model"
    verify_bundle(digits["bundle"], TrustedKeys([digits["keys"].release.public_key]), extract_to=model_dir)
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    x = np.array([r["input_input"] for r in rows], dtype=np.float32)
    logits = session.run(None, {"input": x})[0]
    assert [r["prediction"] for r in rows] == logits.argmax(axis=1).tolist()
    assert np.allclose([r["confidence"] for r in rows], _softmax_max(logits), atol=1e-5)
    conf = np.array([r["confidence"] for r in rows])
    hard_rows = np.array([r["stream"] == "hard" for r in rows])
    assert (conf[hard_rows] < THRESHOLD).all()  # the hard stream holds only the unsure rows
    assert (conf[~hard_rows] >= THRESHOLD).any() and (conf[~hard_rows] >= THRESHOLD).mean() > 0.5  # uniform: all kinds
