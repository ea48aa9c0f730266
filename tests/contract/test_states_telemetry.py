"""State transition rules, histogram helpers and PSI."""

from __future__ import annotations

import itertools
import math

import pytest

from edgeota_contract.states import DeploymentState as S
from edgeota_contract.states import RolloutState, deployment_transition_allowed
from edgeota_contract.telemetry import (
    FeatureReference,
    FeatureSummary,
    bucket_index,
    histogram_quantile,
    merge_counts,
    psi,
)


def test_happy_path_moves_forward_only() -> None:
    path = [S.PENDING, S.NOTIFIED, S.DOWNLOADING, S.DOWNLOADED, S.VERIFYING, S.INSTALLING, S.TRIAL, S.COMMITTED]
    for a, b in itertools.pairwise(path):
        assert deployment_transition_allowed(a, b)
        assert not deployment_transition_allowed(b, a)  # late report of an earlier step
    assert deployment_transition_allowed(S.NOTIFIED, S.TRIAL)  # skipped steps are fine
    assert not deployment_transition_allowed(S.TRIAL, S.TRIAL)  # duplicate


def test_terminal_states() -> None:
    for state in (S.DOWNLOADING, S.TRIAL, S.PENDING):
        assert deployment_transition_allowed(state, S.FAILED)
        assert deployment_transition_allowed(state, S.ROLLED_BACK)
    assert deployment_transition_allowed(S.COMMITTED, S.ROLLED_BACK)
    assert not deployment_transition_allowed(S.COMMITTED, S.FAILED)
    assert not deployment_transition_allowed(S.FAILED, S.COMMITTED)
    assert not deployment_transition_allowed(S.ROLLED_BACK, S.COMMITTED)
    assert not deployment_transition_allowed(S.FAILED, S.ROLLED_BACK)
    assert RolloutState.ROLLED_BACK.terminal and not RolloutState.PAUSED.terminal


def test_bucket_convention() -> None:
    edges = [0.0, 1.0, 2.0]
    assert [bucket_index(edges, x) for x in (-1, 0, 0.5, 1, 1.5, 2, 9)] == [0, 1, 1, 2, 2, 3, 3]


def test_psi_identical_is_zero_and_shift_is_large() -> None:
    ref = [10, 80, 100, 80, 10]
    assert psi(ref, ref) == pytest.approx(0.0)
    assert psi(ref, [x * 3 for x in ref]) == pytest.approx(0.0)  # scale-free
    assert 0.0 < psi(ref, [12, 85, 95, 78, 10]) < 0.1
    assert psi(ref, [100, 80, 10, 10, 0]) > 0.25
    assert psi(ref, [0, 0, 0, 0, 0]) == 0.0
    with pytest.raises(ValueError):
        psi([1, 2], [1, 2, 3])


def test_quantile_and_merge() -> None:
    edges = [1.0, 2.0, 5.0]
    counts = [0, 90, 5, 5]
    assert histogram_quantile(edges, counts, 0.5) == 2.0
    assert histogram_quantile(edges, counts, 0.99) == math.inf
    assert histogram_quantile(edges, [0, 0, 0, 0], 0.5) is None
    assert merge_counts([1, 2], [3, 4]) == [4, 6]
    with pytest.raises(ValueError):
        merge_counts([1], [1, 2])


@pytest.mark.parametrize(("edges", "counts"), [([1.0, 1.0], [0, 0, 0]), ([1.0, 2.0], [0, 0]), ([1.0, 2.0], [0, -1, 0])])
def test_bad_histograms_rejected(edges: list[float], counts: list[int]) -> None:
    with pytest.raises(ValueError):
        FeatureReference(input="x", edges=edges, counts=counts)


@pytest.mark.parametrize(
    ("edges", "counts", "needle"),
    [
        ([0.1, 0.2], [1, 2], "len\\(edges\\)\\+1"),
        ([0.2, 0.1], [1, 2, 3], "strictly ascending"),
        ([0.1, 0.1], [1, 2, 3], "strictly ascending"),
        ([0.1, float("nan"), 0.3], [1, 2, 3, 4], "strictly ascending"),
        ([0.1], [1, -1], "non-negative"),
    ],
)
def test_bad_histograms_refused(edges: list[float], counts: list[int], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        FeatureSummary(input="x", feature=0, edges=edges, counts=counts)
    assert FeatureSummary(input="x", feature=0, edges=[0.1, 0.2, float("inf")], counts=[1, 0, 2, 3]).counts[-1] == 3
