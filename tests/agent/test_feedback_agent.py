"""Feedback through the agent: remembered predictions, the endpoint's feedback call, the durable feedback spool."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.serving import oip, predictions
from device_agent.serving.predictions import (
    MAX_ROWS,
    FeedbackError,
    PredictionMemory,
    feedback_item,
    parse_feedback,
    record,
    top1,
)
from device_agent.serving.runtime import SessionCache
from device_agent.settings import AgentConfig
from edgeota_contract.manifest import BundleManifest
from edgeota_contract.messages import MAX_FEEDBACK_ITEMS, FeedbackReport
from tests.agent.bundles import reference_model, sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

SHA = "a" * 64


def _manifest(outputs: list[tuple[str, list[Any]]] | None = None) -> BundleManifest:
    from datetime import UTC, datetime

    return BundleManifest.model_validate(
        {
            "model_name": "digits",
            "version": "1.0.0",
            "release_counter": 1_000_000,
            "hardware_profile": "x86",
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": n, "dtype": "float32", "shape": s} for n, s in (outputs or [("y", [None, 3])])],
            "opset": 17,
            "execution_provider": "CPUExecutionProvider",
            "recipe": "fp32",
            "files": [
                {"name": n, "sha256": SHA, "size": 1}
                for n in ("model.onnx", "reference_stats.json", "test_vectors.npz", "model_card.md")
            ],
            "lineage": {
                "source_model_sha256": SHA,
                "packager_version": "0",
                "created_at": datetime(2026, 1, 1, tzinfo=UTC).isoformat(),
                "created_by": "tests",
            },
            "signing_key_id": "0" * 16,
        }
    )


# ------------------------------------------------------------------ pure parts


def test_top1_per_row_with_probabilities_logits_and_non_finite_rows() -> None:
    m = _manifest()
    probs = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [np.nan, 0.5, 0.5]], dtype=np.float32)
    rows, predicted, conf = top1(m, {"y": probs})
    assert rows == 3 and predicted == (1, 0, None)
    assert conf[0] == pytest.approx(0.7) and conf[1] == pytest.approx(0.6) and conf[2] is None
    logits = np.array([[0.0, 2.0, 0.0]], dtype=np.float32)
    _, predicted, conf = top1(m, {"y": logits})
    assert predicted == (1,) and conf[0] == pytest.approx(np.exp(2) / (np.exp(2) + 2))
    # the first class output in manifest order; a regression output alone gives no class
    two = _manifest([("score", [None, 1]), ("y", [None, 3])])
    assert top1(two, {"score": np.zeros((1, 1), np.float32), "y": probs[:1]})[1] == (1,)
    reg = _manifest([("score", [None, 1])])
    assert top1(reg, {"score": np.zeros((2, 1), np.float32)}) == (2, (None, None), (None, None))
    big = np.tile(np.array([[0.0, 1.0]], np.float32), (MAX_ROWS + 10, 1))
    rows, predicted, _ = top1(_manifest([("y", [None, 2])]), {"y": big})
    assert rows == MAX_ROWS + 10 and len(predicted) == MAX_ROWS


def test_memory_is_bounded_and_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(predictions.time, "monotonic", lambda: now[0])
    mem = PredictionMemory(max_predictions=3, max_age_seconds=60)
    m = _manifest()
    for i in range(5):
        record(mem, f"p{i}", m, SHA, {"y": np.array([[0.2, 0.8, 0.0]], np.float32)})
    assert len(mem) == 3 and mem.get("p0") is None and mem.get("p1") is None and mem.get("p4") is not None
    now[0] += 61
    assert mem.get("p4") is None
    with pytest.raises(FeedbackError) as err:
        feedback_item(mem, "p4", label=1)
    assert err.value.status == 404
    assert len(PredictionMemory(max_predictions=0)) == 0


def _memory() -> PredictionMemory:
    mem = PredictionMemory()
    record(mem, "one", _manifest(), SHA, {"y": np.array([[0.2, 0.8, 0.0]], np.float32)})
    record(mem, "two", _manifest(), SHA, {"y": np.array([[0.9, 0.1, 0.0], [0.0, 0.1, 0.9]], np.float32)})
    return mem


def test_feedback_item_fills_in_what_was_predicted() -> None:
    mem = _memory()
    item = feedback_item(mem, "one", label=1)
    assert (item.predicted, item.label, item.row, item.version, item.bundle_sha256) == ("1", "1", 0, "1.0.0", SHA)
    assert item.confidence == pytest.approx(0.8)
    second = feedback_item(mem, "two", label="0", row=1, reward=0.25)
    assert (second.predicted, second.label, second.reward) == ("2", "0", 0.25)


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"prediction_id": "nope", "label": 1}, 404, "unknown"),
        ({"prediction_id": "one", "label": 1, "model_name": "other"}, 404, "unknown"),
        ({"prediction_id": "", "label": 1}, 400, "prediction_id"),
        ({"prediction_id": "one"}, 400, "label or a reward"),
        ({"prediction_id": "one", "label": True}, 400, "label"),
        ({"prediction_id": "one", "label": 1.5}, 400, "label"),
        ({"prediction_id": "one", "label": "x" * 129}, 400, "label"),
        ({"prediction_id": "one", "label": "  "}, 400, "label"),
        ({"prediction_id": "one", "reward": 1.5}, 400, "reward"),
        ({"prediction_id": "one", "reward": float("nan")}, 400, "reward"),
        ({"prediction_id": "one", "reward": "1"}, 400, "reward"),
        ({"prediction_id": "one", "label": 1, "row": 1}, 400, "row 1"),
        ({"prediction_id": "two", "label": 1, "row": -1}, 400, "row"),
        ({"prediction_id": "two", "label": 1, "row": True}, 400, "row"),
    ],
)
def test_feedback_item_rejections(kwargs: dict[str, Any], status: int, words: str) -> None:
    pid = kwargs.pop("prediction_id")
    with pytest.raises(FeedbackError) as err:
        feedback_item(_memory(), pid, **kwargs)
    assert err.value.status == status and words in str(err.value)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{", 400, "malformed JSON"),
        (b"[]", 400, "send 1 to"),
        (json.dumps([{"prediction_id": "one", "label": 1}] * (MAX_FEEDBACK_ITEMS + 1)).encode(), 400, "send 1 to"),
        (b"[1]", 400, "JSON object"),
        (b'{"prediction_id": "one", "label": 1, "labels": 2}', 400, "unknown fields: labels"),
        (b'[{"prediction_id": "one", "label": 1}, {"prediction_id": "gone", "label": 1}]', 404, "gone"),
    ],
)
def test_parse_feedback_rejections(body: bytes, status: int, words: str) -> None:
    with pytest.raises(FeedbackError) as err:
        parse_feedback(body, _memory(), "digits")
    assert err.value.status == status and words in str(err.value)


def test_route() -> None:
    assert oip.route("POST", "/v2/models/digits/feedback") == oip.Route("feedback", "digits")
    assert oip.route("POST", "/v2/models/digits/versions/1.0.0/feedback") == oip.Route("feedback", "digits", "1.0.0")
    with pytest.raises(oip.ProtocolError) as err:
        oip.route("GET", "/v2/models/digits/feedback")
    assert err.value.status == 405 and err.value.allow == "POST"


# ------------------------------------------------------------------ through a started agent


@pytest.fixture
def agent(
    tmp_path: Path, keys: Keys, server: BundleServer, publish_bundle: Callable[..., BundleRef]
) -> Iterator[Agent]:
    config = AgentConfig.load(write_config(tmp_path, keys, server.url))
    a = Agent(config, connect=False, session_cache=SessionCache(), serve=True)
    a.start()
    try:
        a.handle_command(signed(assignment(publish_bundle("1.0.0"), deployment_id="dep-0"), keys.server))
        assert a.wait_idle(30)
        yield a
    finally:
        a.stop()


def _client(agent: Agent) -> httpx.Client:
    sock = str(agent.config.settings.serve_socket_path)
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://agent")


def _infer(c: httpx.Client, rows: int) -> tuple[str, np.ndarray]:
    x = sample_inputs(rows, seed=3)
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    r = c.post("/v2/models/digits/infer", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["parameters"]["prediction_id"]), reference_model(x).argmax(axis=1)


def _spooled(agent: Agent) -> list[FeedbackReport]:
    assert agent.outbox.feedback is not None
    return [FeedbackReport.model_validate_json(p) for _, p in agent.outbox.feedback.oldest(100)]


def test_endpoint_feedback_is_spooled_with_what_was_predicted(agent: Agent) -> None:
    with _client(agent) as c:
        pid, truth = _infer(c, 1)
        batch, batch_truth = _infer(c, 3)
        wrong = (int(truth[0]) + 1) % 3
        r = c.post("/v2/models/digits/feedback", json={"prediction_id": pid, "label": wrong})
        assert r.status_code == 202, r.text
        assert r.json()["items"][0] == {
            "prediction_id": pid,
            "row": 0,
            "predicted": str(truth[0]),
            "label": str(wrong),
            "correct": False,
            "reward": None,
        }
        rows = [{"prediction_id": batch, "row": i, "label": int(batch_truth[i])} for i in range(3)]
        r = c.post("/v2/models/digits/feedback", json=rows)
        assert r.status_code == 202 and [i["correct"] for i in r.json()["items"]] == [True] * 3
        # refusals, in the protocol's error format; nothing is spooled for them
        for body, status in (
            ({"prediction_id": "unknown", "label": 1}, 404),
            ({"prediction_id": pid}, 400),
            ({"prediction_id": pid, "label": 1, "row": 1}, 400),
            ([{"prediction_id": pid, "label": 1}, {"prediction_id": "unknown", "label": 1}], 404),
        ):
            r = c.post("/v2/models/digits/feedback", json=body)
            assert r.status_code == status and "error" in r.json(), (body, r.text)
        assert c.post("/v2/models/digits/feedback", content=b"{").status_code == 400
        assert c.post("/v2/models/other/feedback", json={"prediction_id": pid, "label": 1}).status_code == 404
        assert c.get("/v2/models/digits/feedback").status_code == 405
    reports = _spooled(agent)
    assert [len(r.items) for r in reports] == [1, 3]
    first = reports[0].items[0]
    assert (first.prediction_id, first.predicted, first.label, first.version) == (
        pid,
        str(truth[0]),
        str(wrong),
        "1.0.0",
    )
    assert first.bundle_sha256 == agent.runtime.current.bundle_sha256  # type: ignore[union-attr]


def test_in_process_feedback_survives_a_restart(agent: Agent) -> None:
    x = sample_inputs(1, seed=4)
    outputs, prediction = agent.predict_tracked({"x": x})
    assert prediction.predicted == (int(np.asarray(outputs["y"]).argmax()),) == (int(reference_model(x).argmax()),)
    item = agent.feedback(prediction.prediction_id, label=prediction.predicted[0], reward=1.0)
    assert item.predicted == item.label and item.reward == 1.0
    with pytest.raises(FeedbackError):
        agent.feedback("never-returned", label=1)
    agent.stop()
    agent.start()  # the spool is on disk: the report is still there, waiting for its Ack
    (report,) = _spooled(agent)
    assert report.items[0].prediction_id == prediction.prediction_id
    agent.outbox.acked([report.msg_id])
    assert _spooled(agent) == []


def test_sampled_inputs_name_their_prediction(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from device_agent.serving.predictions import PREDICTION_ID
    from device_agent.telemetry.sampling import HardPolicy, InputSampler

    model: Any = SimpleNamespace(manifest=SimpleNamespace(model_name="digits", version="1.0.0"), bundle_sha256=SHA)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.45, 0.55]], dtype=np.float32)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)

    def sampled(rate: float, pid: str | None) -> dict[str, np.ndarray]:
        folder = tmp_path / f"{rate}-{pid}"
        hard = HardPolicy(rate=1.0, confidence_threshold=0.58, max_per_hour=None, max_files=10)
        sampler = InputSampler(folder, rate=rate, max_files=10, hard=hard)
        token = PREDICTION_ID.set(pid)
        try:
            sampler(model, {"x": x}, {"y": probs}, 1)
        finally:
            PREDICTION_ID.reset(token)
        assert sampler.persist() == 1
        (path,) = sampler.pending()
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}

    uniform = sampled(1.0, "req-1")
    assert str(uniform["meta.prediction_id"]) == "req-1" and "meta.request_row" not in uniform
    hard = sampled(0.0, "req-2")  # row 2 (0.55) is under the threshold; rows 0 and 1 are not
    assert str(hard["meta.prediction_id"]) == "req-2" and hard["meta.request_row"].tolist() == [2]
    plain = sampled(1.0, None)  # Agent.predict: no prediction id
    assert "meta.prediction_id" not in plain and "meta.request_row" not in plain
