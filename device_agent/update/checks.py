"""Decisions of the update path as plain functions: may an assignment run, did a model pass its
smoke test, is a model in trial healthy."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from device_agent._lazy import lazy_module
from device_agent.serving.runtime import LoadedModel, ModelError
from device_agent.store import AgentState
from edgeota_contract.manifest import (
    METRIC_SMOKE_ATOL,
    METRIC_SMOKE_RTOL,
    TEST_VECTOR_INPUT_PREFIX,
    TEST_VECTOR_OUTPUT_PREFIX,
    TEST_VECTORS_FILE,
)
from edgeota_contract.messages import Assignment
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")


class Verdict(StrEnum):
    START = "start"
    CONTINUE = "continue"
    QUEUE = "queue"
    REREPORT = "rereport"
    ALREADY_INSTALLED = "already_installed"
    REJECT = "reject"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: ReasonCode = ReasonCode.OK
    detail: str = ""


def policy_problem(assignment: Assignment, state: AgentState, hardware_profile: str) -> Decision | None:
    """Why this (authentic, fresh) assignment may not be installed on this device, or None."""
    if assignment.hardware_profile != hardware_profile:
        return Decision(
            Verdict.REJECT,
            ReasonCode.WRONG_PROFILE,
            f"assignment is for profile {assignment.hardware_profile!r}, this device is {hardware_profile!r}",
        )
    committed = state.committed_counters.get(assignment.model_name)
    if assignment.mode == "install" and committed is not None and assignment.release_counter < committed:
        return Decision(
            Verdict.REJECT,
            ReasonCode.RELEASE_COUNTER_ROLLBACK,
            f"release counter {assignment.release_counter} is below the committed {committed}",
        )
    return None


def decide(assignment: Assignment, state: AgentState, hardware_profile: str) -> Decision:
    """What to do with an authentic assignment for this device (contract section 5, rule 4)."""
    if state.finished_by_id(assignment.deployment_id) is not None:
        return Decision(Verdict.REREPORT, ReasonCode.ASSIGNMENT_REPLAYED, "deployment already finished")
    current = state.deployment
    if current is not None and current.deployment_id == assignment.deployment_id:
        return Decision(Verdict.CONTINUE)
    if assignment.nonce in state.used_nonces:
        return Decision(Verdict.REJECT, ReasonCode.ASSIGNMENT_REPLAYED, "command nonce was already used")
    problem = policy_problem(assignment, state, hardware_profile)
    if problem is not None:
        return problem
    if current is not None:
        return Decision(Verdict.QUEUE)
    active = state.active()
    if active is not None and active.bundle_sha256 == assignment.bundle_sha256 and assignment.mode != "shadow":
        return Decision(Verdict.ALREADY_INSTALLED, ReasonCode.OK, "bundle already installed and committed")
    return Decision(Verdict.START)


def _vectors(model: LoadedModel) -> dict[str, np.ndarray]:
    try:
        with np.load(model.folder / TEST_VECTORS_FILE, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except Exception as exc:  # numpy raises many kinds on a bad archive
        raise ModelError(f"cannot read test vectors: {exc}", ReasonCode.SMOKE_TEST_FAILED) from exc


def _inputs_of(model: LoadedModel, vectors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    inputs = {}
    for name in model.input_names:
        key = TEST_VECTOR_INPUT_PREFIX + name
        if key not in vectors:
            raise ModelError(f"test vectors lack {key}", ReasonCode.SMOKE_TEST_FAILED)
        inputs[name] = vectors[key]
    return inputs


def smoke_inputs(model: LoadedModel) -> dict[str, np.ndarray]:
    """The test-vector inputs of a model's bundle. Raises ModelError(smoke_test_failed)."""
    return _inputs_of(model, _vectors(model))


def smoke_test(model: LoadedModel) -> list[float]:
    """Run the bundle's test vectors; return per-batch latencies in ms.

    Raises:
        ModelError: ``smoke_test_failed`` (missing vectors, outputs off tolerance) or
            ``nan_output`` (NaN/inf where the packaging host got finite values).
    """
    vectors = _vectors(model)
    inputs = _inputs_of(model, vectors)
    metrics = model.manifest.metrics
    atol, rtol = metrics.get(METRIC_SMOKE_ATOL, 1e-4), metrics.get(METRIC_SMOKE_RTOL, 1e-3)
    latencies = []
    for _ in range(3):
        started = time.perf_counter()
        try:
            outputs = model.run(inputs)
        except ModelError as exc:
            raise ModelError(str(exc), ReasonCode.SMOKE_TEST_FAILED) from exc
        latencies.append((time.perf_counter() - started) * 1000.0)
    for name in model.output_names:
        expected = vectors.get(TEST_VECTOR_OUTPUT_PREFIX + name)
        if expected is None:
            raise ModelError(f"test vectors lack {TEST_VECTOR_OUTPUT_PREFIX}{name}", ReasonCode.SMOKE_TEST_FAILED)
        got = outputs[name]
        if got.shape != expected.shape:
            raise ModelError(
                f"output {name} has shape {got.shape}, expected {expected.shape}", ReasonCode.SMOKE_TEST_FAILED
            )
        if np.issubdtype(got.dtype, np.floating):
            bad = ~np.isfinite(got) & np.isfinite(expected.astype(np.float64))
            if bad.any():
                raise ModelError(f"output {name} has {int(bad.sum())} NaN/inf values", ReasonCode.NAN_OUTPUT)
        if not np.allclose(got, expected, atol=atol, rtol=rtol, equal_nan=True):
            worst = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
            raise ModelError(
                f"output {name} differs from the test vectors (max abs diff {worst:.3g}, atol {atol}, rtol {rtol})",
                ReasonCode.SMOKE_TEST_FAILED,
            )
    return latencies


def count_non_finite(outputs: dict[str, np.ndarray]) -> int:
    return int(sum(int((~np.isfinite(v)).sum()) for v in outputs.values() if np.issubdtype(v.dtype, np.floating)))


@dataclass
class HealthStats:
    """What a model did during its trial (live requests and test-vector probes)."""

    requests: int = 0
    errors: int = 0
    nan_outputs: int = 0
    latencies_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class HealthPolicy:
    max_error_rate: float = 0.05
    min_requests: int = 10
    max_nan_outputs: int = 0
    latency_budget_ms: float | None = None
    baseline_ms: float | None = None
    """The previous model's median latency on the same test vectors."""
    latency_factor: float = 3.0
    latency_slack_ms: float = 2.0


def quantile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


MIN_LATENCY_SAMPLES = 3


def judge_health(stats: HealthStats, policy: HealthPolicy, final: bool = True) -> tuple[ReasonCode, str] | None:
    """The first health rule the trial broke, as (reason, detail), or None when healthy.

    NaN/inf outputs and the error rate are judged at any time; latency only when ``final`` (at the end
    of the window, with at least a few samples), on the median so one scheduling hiccup cannot fail it.
    """
    if stats.nan_outputs > policy.max_nan_outputs:
        return ReasonCode.NAN_OUTPUT, f"{stats.nan_outputs} NaN/inf output values during the trial"
    if stats.requests >= policy.min_requests and stats.errors / stats.requests > policy.max_error_rate:
        return ReasonCode.ERROR_RATE, f"{stats.errors} of {stats.requests} requests failed"
    if not final or len(stats.latencies_ms) < MIN_LATENCY_SAMPLES:
        return None
    median = quantile(stats.latencies_ms, 0.5)
    assert median is not None
    if policy.latency_budget_ms is not None and median > policy.latency_budget_ms:
        return ReasonCode.LATENCY_OVER_BUDGET, f"median {median:.3f} ms over the budget {policy.latency_budget_ms} ms"
    if policy.baseline_ms is not None:
        limit = policy.baseline_ms * policy.latency_factor + policy.latency_slack_ms
        if median > limit:
            return (
                ReasonCode.LATENCY_OVER_BUDGET,
                f"median {median:.3f} ms vs the previous model's {policy.baseline_ms:.3f} ms",
            )
    return None
