"""Field accuracy end to end: a real server process, real Mosquitto, a real ``edgeota agent run`` process.

An application sends requests to the agent's inference endpoint, reports true labels for some predictions
(known right and wrong ones) to the agent's feedback call and one to the server's REST API, and
``GET /api/v1/accuracy`` gives exactly the right accuracy for the device's release and cohort. The bundle
carries a confidence calibration, so the label-free estimate is there too: exactly the calibration's
per-bin accuracy weighted by the confidences of the answers the agent returned.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.dataset as pads
import pytest

from edgeota_contract.calibration import CALIBRATION_FILE, ConfidenceCalibration, OutputCalibration, bin_accuracy
from edgeota_contract.provisioning import DeviceProvisioning
from edgeota_contract.telemetry import CONFIDENCE_EDGES
from ota_server.client import ApiClient, ClientSettings
from packager.calibration import calibration_counts
from packager.stats import confidences
from tests.agent.bundles import CLASSES, FEATURES, make_bundle, make_payload, reference_model, sample_inputs
from tests.conftest import Broker

from .conftest import ADMIN, Keys
from .procs import ServerProcess, agent_process, wait_for_agent
from .test_server_process import publish, rollout_state, wait_for

pytestmark = pytest.mark.integration
PROFILE = "x86_64-avx2"
REQUESTS = 30


def _calibration() -> ConfidenceCalibration:
    """Histogram binning on labelled 'evaluation' rows of the bundle's model, with 30% of the labels wrong."""
    rng = np.random.default_rng(11)
    x = sample_inputs(2000, seed=11)
    y = reference_model(x)
    labels = y.argmax(axis=1)
    flip = rng.random(len(labels)) < 0.3
    labels[flip] = (labels[flip] + 1) % CLASSES
    counts, correct = calibration_counts(y, labels)
    out = OutputCalibration(output="y", edges=list(CONFIDENCE_EDGES), counts=counts, correct=correct)
    return ConfidenceCalibration(outputs=[out])


def _bundle(path: Path, keys: Keys, cal: ConfidenceCalibration) -> Path:
    payload = {**make_payload(0), CALIBRATION_FILE: cal.model_dump_json().encode()}
    make_bundle(path, keys.release, version="1.0.0", profile=PROFILE, payload=payload)
    return path


@pytest.fixture
def server(tmp_path: Path, db_url: str, keys: Keys, mqtt_broker: Broker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path, db_url, keys, mqtt_broker)
    with proc.running():
        yield proc


def _agent_config(server: ServerProcess, tmp_path: Path, device_id: str) -> Path:
    body = {"device_id": device_id, "hardware_profile": PROFILE, "labels": {"cohort": "north"}}
    prov = DeviceProvisioning.model_validate(
        tomllib.loads(server.api("POST", "/api/v1/devices", json=body)["agent_toml"])
    )
    prov.agent.update(
        {
            "state_dir": str(tmp_path / "agent-state"),
            "telemetry_window_seconds": 1.0,
            "heartbeat_seconds": 2.0,
            "report_retry_seconds": 1.0,
            "trial_seconds": 1.0,
            "trial_requests": 0,
            "sample_rate": 1.0,  # every request's inputs go to the server, named by their prediction id
        }
    )
    config = tmp_path / "agent.toml"
    config.write_text(prov.to_toml())
    return config


def _accuracy(server: ServerProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = server.api("GET", "/api/v1/accuracy", params={"model_name": "digits"})["rows"]
    return rows


def test_feedback_labels_give_the_right_accuracy_and_the_estimate_is_beside_it(
    server: ServerProcess, keys: Keys, tmp_path: Path
) -> None:
    cal = _calibration()
    release = publish(server, _bundle(tmp_path / "digits-1.0.0.tar", keys, cal))
    device = f"fb-{uuid.uuid4().hex[:8]}"
    config = _agent_config(server, tmp_path, device)
    sock = tmp_path / "agent-state" / "serve.sock"
    log = config.with_suffix(".log")
    with agent_process(config) as proc:
        rollout = {"release_id": release["release_id"], "selector": {"device_ids": [device]}, "start": True}
        rid = server.api("POST", "/api/v1/rollouts", json=rollout)["rollout_id"]
        wait_for_agent(lambda: rollout_state(server, rid)["state"] == "completed", 90, "1.0.0 installed", proc, log)
        x = sample_inputs(REQUESTS, seed=21)
        answers = []
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=10) as app:
            for row in x:
                body = {"inputs": [{"name": "x", "shape": [1, FEATURES], "datatype": "FP32", "data": row.tolist()}]}
                r = app.post("/v2/models/digits/infer", json=body)
                assert r.status_code == 200, r.text
                answers.append(r.json())
            predicted = [int(np.argmax(a["outputs"][0]["data"])) for a in answers]
            # the application knows the truth for 6 of them: 4 right, 2 wrong
            reported_labels = []
            for i in range(6):
                label = predicted[i] if i < 4 else (predicted[i] + 1) % CLASSES
                reported_labels.append(label)
                fb = {"prediction_id": answers[i]["parameters"]["prediction_id"], "label": label}
                r = app.post("/v2/models/digits/feedback", json=fb)
                assert r.status_code == 202, r.text
                assert r.json()["items"][0]["correct"] is (i < 4)
            assert (
                app.post("/v2/models/digits/feedback", json={"prediction_id": "0" * 32, "label": 1}).status_code == 404
            )
        # one more, learnt later by the application's backend and reported to the server itself: a wrong one
        late = answers[6]
        item = {
            "prediction_id": late["parameters"]["prediction_id"],
            "model_name": late["model_name"],
            "version": late["model_version"],
            "bundle_sha256": late["parameters"]["bundle_sha256"],
            "predicted": str(predicted[6]),
            "label": str((predicted[6] + 3) % CLASSES),
        }
        resp = server.http.post(
            "/api/v1/feedback", json={"device_id": device, "items": [item]}, headers=make_token_http(server, "operator")
        )
        assert resp.status_code == 201, resp.text

        def settled() -> list[dict[str, Any]] | None:
            rows = _accuracy(server)
            done = len(rows) == 1 and rows[0]["labelled"] == 7 and rows[0]["estimate_requests"] == REQUESTS
            return rows if done else None

        (row,) = wait_for_agent(settled, 60, "feedback and telemetry at the server", proc, log)
    assert (row["version"], row["hardware_profile"], row["cohort"]) == ("1.0.0", PROFILE, "north")
    assert (row["labelled"], row["correct"]) == (7, 4)
    assert row["accuracy"] == 4 / 7
    # the estimate: the calibration's per-bin accuracy, weighted by the confidences of the answers returned
    outputs = np.array([a["outputs"][0]["data"] for a in answers], dtype=np.float32)
    bins = np.searchsorted(CONFIDENCE_EDGES, confidences(outputs), side="right")
    probs = bin_accuracy(cal.outputs[0])
    assert row["estimated_accuracy"] == pytest.approx(float(np.mean([probs[b] for b in bins])), rel=1e-9)
    # the dataset export joins the samples with the labels reported for their predictions
    with ApiClient(ClientSettings(url=server.url, token=ADMIN)) as api:
        wait_for(lambda: api.samples("digits").count == REQUESTS, 30, "every request sampled")
        api.export_dataset(tmp_path / "export", "digits")
    table = pads.dataset(tmp_path / "export", format="parquet", partitioning="hive").to_table().to_pylist()
    labelled = sorted((tuple(r["input_x"]), r["label"], r["label_source"]) for r in table if r["label"] is not None)
    reported = [int(fb) for fb in (*reported_labels, item["label"])]
    expected = sorted((tuple(np.float32(v) for v in x[i]), reported[i], "feedback") for i in range(7))
    assert [(lab, src) for _, lab, src in labelled] == [(lab, src) for _, lab, src in expected]
    assert {inp for inp, _, _ in labelled} == {inp for inp, _, _ in expected}
    assert sum(r["label"] is None for r in table) == REQUESTS - 7


def make_token_http(server: ServerProcess, role: str) -> dict[str, str]:
    resp = server.http.post("/api/v1/tokens", json={"role": role, "name": role})
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}
