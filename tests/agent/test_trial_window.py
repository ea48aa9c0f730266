"""The trial window judges latency even for a model too slow to give enough samples in time (unit, fakes)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from device_agent.serving.runtime import ModelError
from device_agent.settings import AgentSettings
from device_agent.update import trial
from device_agent.update.checks import MIN_LATENCY_SAMPLES
from edgeota_contract.manifest import METRIC_LATENCY_BUDGET_MS
from edgeota_contract.states import ReasonCode


@dataclass
class _Manifest:
    metrics: dict[str, float] = field(default_factory=lambda: {METRIC_LATENCY_BUDGET_MS: 20.0})


@dataclass
class _SlowModel:
    """Stands in for a LoadedModel: each run takes ``seconds`` (or fails when ``fail`` is set)."""

    seconds: float
    fail: bool = False
    runs: int = 0
    manifest: _Manifest = field(default_factory=_Manifest)
    bundle_sha256: str = "b" * 64

    def run(self, inputs: Any) -> dict[str, np.ndarray]:
        self.runs += 1
        time.sleep(self.seconds)
        if self.fail:
            raise ModelError("broken", ReasonCode.LOAD_FAILED)
        return {"y": np.zeros((1, 2), np.float32)}


@pytest.fixture(autouse=True)
def _no_test_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trial, "smoke_inputs", lambda model: {})


def _settings(tmp_path: Any) -> AgentSettings:
    return AgentSettings(state_dir=tmp_path, trial_seconds=0.05, trial_requests=0, trial_probe_interval_seconds=0.01)


def test_model_slower_than_the_window_is_still_judged(tmp_path: Any) -> None:
    model = _SlowModel(seconds=0.08)  # one probe outlasts the whole 50 ms window; budget 20 ms
    with pytest.raises(ModelError) as err:
        trial.TrialMonitor().run(model, _settings(tmp_path), None, time.sleep)  # type: ignore[arg-type]
    assert err.value.reason == ReasonCode.LATENCY_OVER_BUDGET
    assert model.runs == MIN_LATENCY_SAMPLES


def test_fast_model_passes_after_the_extra_probes(tmp_path: Any) -> None:
    model = _SlowModel(seconds=0.0)
    stats = trial.TrialMonitor().run(model, _settings(tmp_path), None, time.sleep)  # type: ignore[arg-type]
    assert len(stats.latencies_ms) >= MIN_LATENCY_SAMPLES


def test_probes_that_always_fail_do_not_hold_the_trial_open(tmp_path: Any) -> None:
    model = _SlowModel(seconds=0.06, fail=True)
    trial.TrialMonitor().run(model, _settings(tmp_path), None, time.sleep)  # type: ignore[arg-type]
    assert model.runs <= 1 + MIN_LATENCY_SAMPLES
