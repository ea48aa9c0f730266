"""The trial window after a switch: collect health from live requests and test-vector probes, judge it.

:class:`TrialMonitor` is a :class:`~device_agent.serving.runtime.ModelRuntime` listener that counts only
requests served by the model in trial. :meth:`TrialMonitor.run` probes the model with its test
vectors every ``trial_probe_interval_seconds`` (so health is judged even without traffic) and ends
after ``trial_requests`` live requests or ``trial_seconds``, whichever comes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from device_agent.serving.runtime import LoadedModel, ModelError
from device_agent.settings import AgentSettings
from device_agent.update.checks import (
    MIN_LATENCY_SAMPLES,
    HealthPolicy,
    HealthStats,
    count_non_finite,
    judge_health,
    smoke_inputs,
)
from edgeota_contract.manifest import METRIC_LATENCY_BUDGET_MS


class TrialMonitor:
    """Health of the model in trial. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: tuple[str, HealthStats] | None = None

    def __call__(self, model: LoadedModel, inputs: Any, outputs: Any, latency_ns: int) -> None:
        active = self._active  # outside a trial (nearly always) a request costs one read, no lock
        if active is None or active[0] != model.bundle_sha256:
            return
        with self._lock:
            if self._active is not active:
                return
            stats = active[1]
            stats.requests += 1
            if outputs is None:
                stats.errors += 1
            else:
                stats.latencies_ms.append(latency_ns / 1e6)
                stats.nan_outputs += count_non_finite(outputs)

    def watch(self, bundle_sha256: str) -> None:
        """Start counting requests served by this bundle (call before it is installed)."""
        with self._lock:
            self._active = (bundle_sha256, HealthStats())

    def run(
        self,
        model: LoadedModel,
        settings: AgentSettings,
        baseline_ms: float | None,
        sleep: Callable[[float], None],
    ) -> HealthStats:
        """Watch ``model`` for one trial window; return its stats when healthy.

        Raises:
            ModelError: with the reason of the first broken health rule (``nan_output``,
                ``error_rate``, ``latency_over_budget``).
        """
        s = settings
        stats = HealthStats()
        policy = HealthPolicy(
            max_error_rate=s.health_max_error_rate,
            min_requests=s.health_min_requests,
            max_nan_outputs=s.health_max_nan_outputs,
            latency_budget_ms=model.manifest.metrics.get(METRIC_LATENCY_BUDGET_MS),
            baseline_ms=baseline_ms,
            latency_factor=s.health_latency_factor,
            latency_slack_ms=s.health_latency_slack_ms,
        )
        with self._lock:
            if self._active is not None and self._active[0] == model.bundle_sha256:
                stats = self._active[1]  # requests since :meth:`watch` count too
            self._active = (model.bundle_sha256, stats)
        started = time.monotonic()
        extra_probes = 0
        try:
            while True:
                self._probe(model, stats)
                elapsed = time.monotonic() - started
                done = bool(s.trial_requests and stats.requests >= s.trial_requests) or elapsed >= s.trial_seconds
                with self._lock:
                    # A model so slow that the window closes before it gave enough latency samples must
                    # not pass unjudged: probe again at once until it has (at most MIN_LATENCY_SAMPLES more
                    # probes, so a model whose every probe fails cannot hold the trial open).
                    short = (
                        done and len(stats.latencies_ms) < MIN_LATENCY_SAMPLES and extra_probes < MIN_LATENCY_SAMPLES
                    )
                    verdict = judge_health(stats, policy, final=done and not short)
                if verdict is not None:
                    raise ModelError(verdict[1], verdict[0])
                if short:
                    extra_probes += 1
                    continue
                if done:
                    return stats
                sleep(min(s.trial_probe_interval_seconds, max(0.0, s.trial_seconds - elapsed)))
        finally:
            with self._lock:
                self._active = None

    def _probe(self, model: LoadedModel, stats: HealthStats) -> None:
        inputs = smoke_inputs(model)
        started = time.perf_counter()
        try:
            outputs = model.run(inputs)
        except ModelError:
            with self._lock:
                stats.errors += 1
            return
        with self._lock:
            stats.latencies_ms.append((time.perf_counter() - started) * 1000.0)
            stats.nan_outputs += count_non_finite(outputs)


def trial_settings(settings: AgentSettings, known_good: bool) -> AgentSettings:
    """The settings a trial runs with: a rollback to a known-good bundle (with ``fast_rollback``) is probed
    for ``rollback_probe_seconds`` only (same health rules: NaN/inf, error rate, latency), not a full window."""
    if not known_good or not settings.fast_rollback:
        return settings
    return settings.model_copy(
        update={"trial_seconds": min(settings.trial_seconds, settings.rollback_probe_seconds), "trial_requests": 0}
    )


def latencies_on(model: LoadedModel, candidate: LoadedModel, runs: int = 3) -> list[float]:
    """Latencies (ms) of ``model`` on ``candidate``'s test vectors: the previous model's baseline."""
    inputs = smoke_inputs(candidate)
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        model.run(inputs)
        out.append((time.perf_counter() - started) * 1000.0)
    return out
