"""Raw-input sampling in two streams: uniform (a random share) and hard (low confidence, shadow disagreement).

Unit tests drive :class:`InputSampler` directly with plain stand-ins for the model; the last two run a real
agent with a real ONNX model (and a real shadow candidate) and read what it uploads.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.serving.runtime import ModelError, SessionCache
from device_agent.settings import AgentConfig, AgentSettings
from device_agent.telemetry.sampling import HardPolicy, HourlyBudget, InputSampler
from tests.agent.bundles import reference_model, sample_inputs
from tests.agent.conftest import BundleRef, Keys, assignment, signed, write_config
from tests.agent.http_server import BundleServer

SHA = "ab" * 32


def _model(sha: str = SHA) -> Any:
    return SimpleNamespace(manifest=SimpleNamespace(model_name="digits", version="1.0.0"), bundle_sha256=sha)


def _probs(confidences: list[float], classes: int = 4) -> np.ndarray:
    """Probability rows whose max is the given confidence (at least 1/classes), on class ``row % classes``."""
    out = np.zeros((len(confidences), classes), dtype=np.float32)
    for i, c in enumerate(confidences):
        out[i, :] = (1.0 - c) / (classes - 1)
        out[i, i % classes] = c
    return out


def _rows(n: int, start: int = 0) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1).repeat(3, axis=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_hourly_budget_is_a_sliding_hour() -> None:
    budget = HourlyBudget(3)
    assert [budget.admit(t) for t in (0.0, 10.0, 20.0, 30.0, 3599.0)] == [True, True, True, False, False]
    assert budget.admit(3600.0)  # the first admission left the window
    assert not budget.admit(3605.0)
    assert budget.refused == 3
    assert all(HourlyBudget(None).admit(0.0) for _ in range(1000))


def test_hard_stream_keeps_only_the_low_confidence_rows(tmp_path: Path) -> None:
    hard = HardPolicy(rate=1.0, confidence_threshold=0.5, max_per_hour=None, max_files=100)
    sampler = InputSampler(tmp_path, rate=0.0, max_files=100, hard=hard)
    assert sampler.enabled
    x = _rows(4)
    sampler(_model(), {"x": x}, {"y": _probs([0.9, 0.3, 0.6, 0.28])}, 1)
    sampler(_model(), {"x": _rows(2, 10)}, {"y": _probs([0.9, 0.95])}, 1)  # sure of both rows: not kept
    sampler(_model(), {"x": _rows(2, 20)}, None, 1)  # a failed request has no confidence
    x[:] = -1  # the application reuses its buffer after predict returned
    assert sampler.persist() == 1
    [path] = sampler.pending()
    assert path.parent.name == "hard" and sampler.pending("uniform") == []
    got = _load(path)
    assert got["in.x"][:, 0].tolist() == [1.0, 3.0]  # rows 1 and 3, copied before the buffer changed
    assert got["meta.prediction"].tolist() == [1, 3]
    assert np.allclose(got["meta.confidence"], [0.3, 0.28])
    assert str(got["meta.stream"]) == "hard" and str(got["meta.reason"]) == "low_confidence"
    assert str(got["meta.bundle_sha256"]) == SHA and str(got["meta.model_name"]) == "digits"
    assert path.name == f"{int(got['meta.time_ns'])}-digits-1.0.0-{SHA[:12]}.npz"


def test_confidence_of_logits_is_the_softmax_max(tmp_path: Path) -> None:
    logits = np.array([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 3.0, 2.9]], dtype=np.float32)
    expected = 1.0 / np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True)).sum(axis=1)
    assert expected[0] > 0.9 and expected[1] < 0.5 and expected[2] < 0.6  # so the threshold splits them
    hard = HardPolicy(rate=1.0, confidence_threshold=0.6, max_per_hour=None, max_files=100)
    sampler = InputSampler(tmp_path, rate=0.0, max_files=100, hard=hard)
    sampler(_model(), {"x": _rows(3)}, {"logits": logits}, 1)
    sampler.persist()
    got = _load(sampler.pending()[0])
    assert got["in.x"][:, 0].tolist() == [1.0, 2.0]
    assert got["meta.prediction"].tolist() == [0, 1]
    assert np.allclose(got["meta.confidence"], expected[1:], rtol=1e-12)


def test_each_stream_keeps_its_own_budget(tmp_path: Path) -> None:
    clock = Clock()
    hard = HardPolicy(rate=1.0, confidence_threshold=0.5, max_per_hour=2, max_files=3)
    sampler = InputSampler(tmp_path, rate=1.0, max_files=100, max_per_hour=3, hard=hard, clock=clock)
    for hour in range(2):
        for i in range(10):  # every request unsure: the uniform stream takes what its budget allows first
            sampler(_model(), {"x": _rows(1, 100 * hour + i)}, {"y": _probs([0.3])}, 1)
        assert len(sampler._queue) == 3 and len(sampler._hard_queue) == 2
        assert [s.inputs["x"][0, 0] for s in sampler._queue] == [100 * hour + i for i in range(3)]
        assert sampler.persist() == 5
        clock.now += 3600.0
    assert len(sampler.pending("uniform")) == 6
    hard_files = sampler.pending("hard")
    assert len(hard_files) == 3 and sampler.dropped == 1  # max_files: the oldest hard sample went
    assert [_load(p)["in.x"][0, 0] for p in hard_files] == [4.0, 103.0, 104.0]
    assert sampler.budgets["uniform"].refused == 14  # 7 drawn requests an hour past its 3...
    assert sampler.budgets["hard"].refused == 10  # ...which the hard stream saw: 5 an hour past its 2


def _uniform_picks(outputs: Callable[[int], np.ndarray], hard: HardPolicy | None, tmp: Path) -> list[int]:
    sampler = InputSampler(tmp, rate=0.1, max_files=100_000, rng=random.Random(11), hard=hard)
    for i in range(3000):
        sampler(_model(), {"x": _rows(1, i)}, {"y": outputs(i)}, 1)
    return [int(s.inputs["x"][0, 0]) for s in sampler._queue]


def test_the_uniform_draw_is_independent_of_confidence(tmp_path: Path) -> None:
    hard = HardPolicy(rate=0.5, confidence_threshold=0.5, max_per_hour=None, max_files=100_000)
    sure = _uniform_picks(lambda i: _probs([0.95]), hard, tmp_path / "a")
    unsure = _uniform_picks(lambda i: _probs([0.3]), hard, tmp_path / "b")
    mixed = _uniform_picks(lambda i: _probs([0.3 if i % 2 else 0.95]), hard, tmp_path / "c")
    no_hard = _uniform_picks(lambda i: _probs([0.3]), None, tmp_path / "d")
    assert sure == unsure == mixed == no_hard  # the same requests, whatever the model said about them
    assert 240 < len(sure) < 360  # 10% of 3000
    odd = sum(i % 2 for i in mixed) / len(mixed)  # half the requests were unsure: so are about half the picks
    assert 0.4 < odd < 0.6


def test_uniform_samples_record_what_the_model_said(tmp_path: Path) -> None:
    (tmp_path / "1-legacy-1.0.0-abcdefabcdef.npz").write_bytes(b"from an older agent")
    sampler = InputSampler(tmp_path, rate=1.0, max_files=10)
    sampler(_model(), {"x": _rows(2)}, {"y": _probs([0.9, 0.4])}, 1)
    sampler(_model(), {"x": _rows(1)}, None, 1)  # an error: no prediction
    sampler(_model(), {"x": _rows(2)}, {"y": np.zeros((3, 4), dtype=np.float32)}, 1)  # rows do not line up
    sampler.persist()
    files = sampler.pending()
    assert files[0].name.startswith("1-legacy") and len(files) == 4  # oldest first, legacy files too
    first, error, misfit = (_load(p) for p in files[1:])
    assert str(first["meta.stream"]) == "uniform" and "meta.reason" not in first
    assert first["meta.prediction"].tolist() == [0, 1] and np.allclose(first["meta.confidence"], [0.9, 0.4])
    assert "meta.prediction" not in error and "meta.prediction" not in misfit
    assert int(first["meta.time_ns"]) < int(error["meta.time_ns"]) < int(misfit["meta.time_ns"])


class Candidate:
    """A shadow candidate stand-in: answers ``outputs`` (or fails)."""

    def __init__(self, outputs: np.ndarray | None, sha: str = "cd" * 32) -> None:
        self.outputs = outputs
        self.bundle_sha256 = sha
        self.output_names = ["y"]
        self.calls = 0

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        if self.outputs is None:
            raise ModelError("candidate failed")
        return {"y": self.outputs}


@pytest.mark.parametrize(("candidate_conf", "kept_rows"), [([0.9, 0.9, 0.9], []), ([0.9, 0.8, 0.9], [1]), (None, [])])
def test_shadow_disagreement_goes_to_the_hard_stream(
    tmp_path: Path, candidate_conf: list[float] | None, kept_rows: list[int]
) -> None:
    served = _probs([0.9, 0.9, 0.9])
    theirs = None
    if candidate_conf is not None:
        theirs = _probs(candidate_conf)
        theirs[kept_rows] = np.roll(theirs[kept_rows], 1, axis=1)  # another class on those rows
    candidate = Candidate(theirs)
    hard = HardPolicy(rate=1.0, confidence_threshold=0.5, max_per_hour=None, max_files=100)
    sampler = InputSampler(tmp_path, rate=0.0, max_files=100, hard=hard, shadow=lambda: candidate)  # type: ignore[arg-type,return-value]
    sampler(_model(), {"x": _rows(3)}, {"y": served}, 1)
    sampler(_model(candidate.bundle_sha256), {"x": _rows(3)}, {"y": served}, 1)  # the candidate itself: no check
    assert candidate.calls == 0  # nothing runs on the request path
    sampler.persist()
    assert candidate.calls == 1
    files = sampler.pending("hard")
    if not kept_rows:
        assert files == []
        return
    [path] = files
    got = _load(path)
    assert str(got["meta.reason"]) == "shadow_disagreement"
    assert got["in.x"][:, 0].tolist() == [float(r) for r in kept_rows]
    assert got["meta.prediction"].tolist() == [int(served[r].argmax()) for r in kept_rows]  # the served class


def test_settings_default_to_both_streams_off() -> None:
    s = AgentSettings()
    assert s.sample_rate == 0 and s.hard_sample_rate == 0
    assert s.sample_max_per_hour is None and s.hard_sample_max_per_hour == 60
    with pytest.raises(ValueError):
        AgentSettings(hard_confidence_threshold=0)


# ---------------------------------------------------------------- a real agent, a real model


@pytest.fixture
def make_agent(tmp_path: Path, keys: Keys, server: BundleServer) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**settings: Any) -> Agent:
        cfg = AgentConfig.load(write_config(tmp_path / "dev", keys, server.url, **settings))
        agent = Agent(cfg, session_cache=SessionCache(), connect=False)
        agent.start()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


def _install(agent: Agent, keys: Keys, bundle: BundleRef, **kw: Any) -> None:
    agent.handle_command(signed(assignment(bundle, **kw), keys.server))
    assert agent.wait_idle(30)


def _uploaded(server: BundleServer) -> list[dict[str, np.ndarray]]:
    out = []
    for _, body in server.uploads:
        with np.load(io.BytesIO(body), allow_pickle=False) as npz:
            out.append({k: npz[k] for k in npz.files})
    return out


def test_a_real_agent_uploads_its_unsure_rows(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent(
        hard_sample_rate=1.0,
        hard_confidence_threshold=0.9,
        sample_upload_path="/api/v1/devices/{device_id}/samples",
    )
    _install(agent, keys, publish_bundle("1.0.0"))
    batches = [sample_inputs(8, seed=i) for i in range(4)]
    for x in batches:
        agent.predict({"x": x})
    agent._retry()  # the retry tick persists and uploads
    uploads = _uploaded(server)
    assert uploads and all(str(u["meta.stream"]) == "hard" for u in uploads)
    all_x = np.concatenate(batches)
    probs = reference_model(all_x)
    unsure = all_x[probs.max(axis=1) < 0.9]
    got = np.concatenate([u["in.x"] for u in uploads])
    assert len(got) == len(unsure) > 0 and np.allclose(np.sort(got, axis=0), np.sort(unsure, axis=0))
    for u in uploads:  # the recorded class and confidence are the model's own for those rows
        ref = reference_model(u["in.x"])
        assert u["meta.prediction"].tolist() == ref.argmax(axis=1).tolist()
        assert np.allclose(u["meta.confidence"], ref.max(axis=1), atol=1e-6)
    assert agent.sampler.pending() == []


def test_a_real_agent_samples_where_its_shadow_disagrees(
    make_agent: Callable[..., Agent], keys: Keys, publish_bundle: Callable[..., BundleRef], server: BundleServer
) -> None:
    agent = make_agent(
        hard_sample_rate=1.0,
        hard_confidence_threshold=0.1,  # 10 classes: no row is ever below 0.1, so only disagreement counts
        sample_upload_path="/api/v1/devices/{device_id}/samples",
    )
    _install(agent, keys, publish_bundle("1.0.0"), deployment_id="dep-0")
    _install(agent, keys, publish_bundle("1.2.0", seed=9), deployment_id="dep-s", mode="shadow")
    assert agent.shadow is not None
    x = sample_inputs(16, seed=3)
    agent.predict({"x": x})
    agent._retry()
    uploads = _uploaded(server)
    differ = reference_model(x).argmax(axis=1) != reference_model(x, seed=9).argmax(axis=1)
    assert differ.any()
    [u] = uploads
    assert str(u["meta.reason"]) == "shadow_disagreement" and str(u["meta.version"]) == "1.0.0"
    assert np.array_equal(u["in.x"], x[differ])
    assert u["meta.prediction"].tolist() == reference_model(x[differ]).argmax(axis=1).tolist()
