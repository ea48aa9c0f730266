"""Drift statistics (ota_server.drift): chi-square tail, Benjamini-Hochberg, effect sizes, and the decision rule.

Unit tests over simulated multinomial histograms shaped like the contract's (about 10 bins per feature,
64 features): false alarms in distribution, a shifted feature found, too few values refused.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgeota_contract.errors import ContractError
from edgeota_contract.telemetry import CONFIDENCE_EDGES, FeatureReference, OutputReference, ReferenceStats
from edgeota_contract.telemetry import psi as contract_psi
from ota_server.drift import (
    DriftConfig,
    DriftKey,
    benjamini_hochberg,
    chi2_sf,
    class_key,
    confidence_key,
    evaluate_drift,
    feature_key,
    js_distance,
    psi,
    reference_inputs,
    reference_outputs,
)
from ota_server.drift.stats import (
    chi_square_goodness_of_fit,
    chi_square_two_sample,
    merge_groups,
    regularized_gamma_q,
)

# ---- chi-square survival function ---------------------------------------------------------------


def _even_df_sf(x: float, df: int) -> float:
    """Closed form for even df: exp(-x/2) * sum_{k < df/2} (x/2)^k / k!."""
    half = x / 2
    return math.exp(-half) * sum(half**k / math.factorial(k) for k in range(df // 2))


@pytest.mark.parametrize("df", [2, 4, 6, 10, 20, 40])
@pytest.mark.parametrize("x", [0.001, 0.5, 1.0, 3.0, 9.5, 18.0, 30.0, 60.0, 150.0, 400.0])
def test_chi2_sf_matches_closed_form_for_even_df(df: int, x: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(_even_df_sf(x, df), rel=1e-11, abs=1e-300)


@pytest.mark.parametrize("x", [1e-8, 0.01, 0.455, 1.0, 3.841, 6.63, 10.83, 25.0, 100.0, 600.0])
def test_chi2_sf_matches_closed_form_for_one_df(x: float) -> None:
    assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-11, abs=1e-300)


@pytest.mark.parametrize(
    ("x", "df", "p"),
    [  # critical values from standard chi-square tables (7 significant digits)
        (3.841459, 1, 0.05),
        (6.634897, 1, 0.01),
        (10.82757, 1, 0.001),
        (7.814728, 3, 0.05),
        (16.91898, 9, 0.05),
        (27.87716, 9, 0.001),
        (18.30704, 10, 0.05),
        (23.20925, 10, 0.01),
        (29.58830, 10, 0.001),
        (124.3421, 100, 0.05),
        (4.865182, 10, 0.9),
    ],
)
def test_chi2_sf_matches_table_values(x: float, df: int, p: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(p, rel=1e-5)  # the tables round x to 7 digits


def test_chi2_sf_agrees_with_scipy_over_a_wide_grid() -> None:
    stats = pytest.importorskip("scipy.stats")  # a test-only oracle; the server never imports scipy
    worst = 0.0
    for df in (1, 3, 5, 7, 9, 11, 63, 99, 999, 20_001, 99_999):
        for ratio in (0.001, 0.1, 0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 4.0, 10.0):
            x = df * ratio
            expected = float(stats.chi2.sf(x, df))
            if expected > 1e-280:
                worst = max(worst, abs(chi2_sf(x, df) - expected) / expected)
    assert worst < 1e-8


def test_chi2_sf_limits_and_rejections() -> None:
    assert chi2_sf(0.0, 5) == 1.0
    assert chi2_sf(1e5, 3) == 0.0  # underflows cleanly
    assert regularized_gamma_q(2.5, 0.0) == 1.0
    for statistic, df in ((1.0, 0), (-1.0, 3), (math.nan, 3), (math.inf, 3)):
        with pytest.raises(ValueError):
            chi2_sf(statistic, df)


# ---- Benjamini-Hochberg -------------------------------------------------------------------------


def test_bh_hand_worked_example() -> None:
    # sorted: 0.005 (x4/1 = 0.02), 0.01 (x4/2 = 0.02), 0.03 (x4/3 = 0.04), 0.04 (x4/4 = 0.04); step-up minimum
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_bh_paper_example_rejects_four_at_005() -> None:
    # Benjamini & Hochberg (1995), section 4: 15 p-values; at q = 0.05 the first four are rejected
    p = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719, 0.6528]
    p += [0.7590, 1.0]
    adjusted = benjamini_hochberg(p)
    assert [a < 0.05 for a in adjusted] == [True] * 4 + [False] * 11
    assert adjusted[:4] == pytest.approx([0.0015, 0.003, 0.0095, 0.035625])
    assert adjusted[4] == pytest.approx(0.0201 * 15 / 5)
    assert all(a >= q for a, q in zip(adjusted, p, strict=True))


def test_bh_edge_cases() -> None:
    assert benjamini_hochberg([]) == []
    assert benjamini_hochberg([0.3]) == [0.3]
    assert benjamini_hochberg([0.9, 0.95]) == pytest.approx([0.95, 0.95])
    for bad in ([1.5], [-0.1], [math.nan]):
        with pytest.raises(ValueError):
            benjamini_hochberg(bad)


# ---- effect sizes and the tests -----------------------------------------------------------------


def test_psi_is_the_contracts() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        bins = int(rng.integers(2, 14))
        a = rng.integers(0, 40, bins).tolist()
        b = (rng.integers(0, 40, bins) * rng.integers(0, 2, bins)).tolist()
        assert psi(a, b) == pytest.approx(contract_psi(a, b), rel=1e-12, abs=1e-15)
    assert psi([0, 0], [1, 2]) == 0.0


def test_js_distance_values() -> None:
    assert js_distance([5, 5, 0], [1, 1, 0]) == 0.0
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    # p = (1, 0), q = (1/2, 1/2), m = (3/4, 1/4): JSD = (log2(4/3) + (1/2) log2(2/3) + (1/2) log2 2) / 2
    jsd = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_distance([4, 0], [3, 3]) == pytest.approx(math.sqrt(jsd))
    assert js_distance([4, 0], [3, 3]) == pytest.approx(js_distance([3, 3], [4, 0]))
    assert js_distance([0, 0], [3, 3]) == 0.0


def test_merge_groups_runs_of_adjacent_bins() -> None:
    groups = merge_groups(np.array([1.0, 1.0, 5.0, 0.0, 0.0, 6.0, 1.0]), 5.0)
    assert [(g.start, g.stop) for g in groups] == [(0, 3), (3, 7)]  # the short tail joins the last run
    assert [(g.start, g.stop) for g in merge_groups(np.array([1.0, 2.0]), 5.0)] == [(0, 2)]


def test_two_sample_hand_worked() -> None:
    # 2 x 2: pooled (50, 50) of 100, every expected count 25; X2 = 4 * 5^2 / 25 = 4; df 1
    result = chi_square_two_sample(np.array([20.0, 30.0]), np.array([30.0, 20.0]))
    assert result.statistic == pytest.approx(4.0)
    assert (result.df, result.bins) == (1, 2)
    assert result.p_value == pytest.approx(math.erfc(math.sqrt(2.0)))


def test_goodness_of_fit_hand_worked() -> None:
    result = chi_square_goodness_of_fit(np.array([0.5, 0.5]), np.array([30.0, 20.0]))
    assert result.statistic == pytest.approx(2.0)
    assert result.df == 1
    assert result.p_value == pytest.approx(math.erfc(1.0))


def test_two_sample_merges_sparse_bins_and_drops_empty_ones() -> None:
    ref = np.array([0.0, 50.0, 1.0, 1.0, 48.0, 0.0])
    obs = np.array([0.0, 50.0, 1.0, 0.0, 49.0, 0.0])
    result = chi_square_two_sample(ref, obs)
    assert result.bins == 2 and result.df == 1  # the sparse middle bins joined a neighbour
    single = chi_square_two_sample(np.array([0.0, 30.0]), np.array([0.0, 40.0]))  # a constant feature
    assert (single.df, single.p_value) == (0, 1.0)


def test_tests_reject_malformed_histograms() -> None:
    with pytest.raises(ValueError):
        chi_square_two_sample(np.array([1.0, 2.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError):
        chi_square_two_sample(np.array([1.0, -2.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        chi_square_two_sample(np.array([0.0, 0.0]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        chi_square_goodness_of_fit(np.array([0.5, 0.5]), np.array([0.0, 0.0]))


# ---- the decision rule --------------------------------------------------------------------------

FEATURES = 64


def _feature_probabilities(rng: np.random.Generator) -> np.ndarray:
    """A feature's bin probabilities like the packager's: ~10 decile bins, some collapsed by repeated values."""
    bins = int(rng.integers(4, 11))
    p = rng.dirichlet(np.full(bins, 8.0))
    return np.concatenate([[0.0], p])  # bucket 0 (below the first edge) is empty in the reference


def _reference_and_truth(rng: np.random.Generator, n_ref: int = 1000) -> tuple[dict[int, list[int]], list[np.ndarray]]:
    truth = [_feature_probabilities(rng) for _ in range(FEATURES)]
    reference = {j: rng.multinomial(n_ref, p).tolist() for j, p in enumerate(truth)}
    return reference, truth


def test_in_distribution_rarely_drifts_at_realistic_sizes() -> None:
    rng = np.random.default_rng(2026)
    evaluations, drifted, verdicts = 300, 0, 0
    for _ in range(evaluations):
        reference, truth = _reference_and_truth(rng, n_ref=int(rng.integers(200, 2000)))
        observed = {j: rng.multinomial(int(rng.integers(20, 2001)), p).tolist() for j, p in enumerate(truth)}
        report = evaluate_drift(reference, observed)
        drifted += report.level == "drift"
        verdicts += report.evaluated
        for f in report.features:
            if f.p_value is not None and f.p_adjusted is not None:
                assert 0.0 <= f.p_value <= f.p_adjusted <= 1.0
    assert verdicts > evaluations * FEATURES * 0.5  # most features had enough values
    assert drifted / evaluations < 0.01


def _normal_deciles(shift: float) -> np.ndarray:
    """Bin probabilities of N(shift, 1) on the deciles of N(0, 1) (plus the empty bucket below the first edge)."""
    edges = [-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816]
    cdf = [0.0] + [0.5 * (1 + math.erf((e - shift) / math.sqrt(2))) for e in edges] + [1.0]
    return np.concatenate([[0.0], np.diff(cdf)])


def test_a_shifted_feature_is_named_and_the_others_stay_stable() -> None:
    rng = np.random.default_rng(7)
    named = others = 0
    runs = 20
    shift_size = psi(_normal_deciles(0.0), _normal_deciles(0.5))
    assert 0.15 < shift_size < 0.3, "a modest shift (half a standard deviation), not a gross one"
    for _ in range(runs):
        reference, truth = _reference_and_truth(rng, n_ref=2000)
        reference[12] = rng.multinomial(2000, _normal_deciles(0.0)).tolist()
        shifted = list(truth)
        shifted[12] = _normal_deciles(0.5)
        observed = {j: rng.multinomial(500, q).tolist() for j, q in enumerate(shifted)}
        report = evaluate_drift(reference, observed)
        drift = report.of_level("drift")
        named += any(f.key == 12 for f in drift)
        others += sum(1 for f in drift if f.key != 12)
        assert report.features[0].key == 12 or report.level == "stable"  # worst first
    assert named >= runs - 2
    assert others == 0


def test_insufficient_below_the_minimum_values() -> None:
    reference = {feature_key("x", 0): [50, 50, 50, 50], feature_key("x", 1): [50, 50, 50, 50]}
    observed = {feature_key("x", 0): [0, 0, 0, 199], feature_key("x", 1): [50, 50, 50, 50]}
    report = evaluate_drift(reference, observed)
    short = next(f for f in report.features if f.key == feature_key("x", 0))
    assert (short.level, short.n, short.min_values, short.p_value) == ("insufficient", 199, 200, None)
    assert short.note == "199 of 200 values"
    assert report.evaluated == 1 and report.insufficient == 1 and report.level == "stable"
    assert report.fewest_values == 199
    # one value more and the same gross shift is judged
    observed[feature_key("x", 0)] = [0, 0, 0, 200]
    assert evaluate_drift(reference, observed).level == "drift"


def test_nothing_evaluable_is_insufficient_overall() -> None:
    reference = {feature_key("x", 0): [10, 10], feature_key("x", 1): [0, 0], feature_key("x", 2): [5, 5]}
    observed = {feature_key("x", 0): [3, 4], feature_key("x", 1): [300, 300], feature_key("y", 0): [1, 2]}
    report = evaluate_drift(reference, observed)
    assert report.level == "insufficient" and report.evaluated == 0 and report.insufficient == 3
    notes = {f.label: f.note for f in report.features}
    assert notes == {"x[0]": "7 of 200 values", "x[1]": "empty reference", "x[2]": "0 of 200 values"}
    assert report.unmatched == 1
    assert "3 insufficient (fewest 0 of 200 values)" in report.summary()
    assert evaluate_drift({}, {}).summary() == "nothing to evaluate"


def test_old_psi_rule_fires_on_small_samples_where_the_new_rule_stays_calm() -> None:
    rng = np.random.default_rng(11)
    old_fired = new_drift = new_verdicts = 0
    evaluations = 100
    lenient = DriftConfig(min_values=20)  # let the statistics, not the minimum, carry small samples
    for _ in range(evaluations):
        reference, truth = _reference_and_truth(rng, n_ref=200)
        observed = {j: rng.multinomial(int(rng.integers(20, 60)), p).tolist() for j, p in enumerate(truth)}
        old_fired += max(contract_psi(reference[j], observed[j]) for j in reference) > 0.25
        assert evaluate_drift(reference, observed).level == "insufficient"  # the default refuses to judge
        report = evaluate_drift(reference, observed, lenient)
        new_drift += report.level == "drift"
        new_verdicts += report.evaluated
    assert old_fired / evaluations > 0.9
    assert new_verdicts == evaluations * FEATURES
    assert new_drift == 0


def test_identical_distributions_are_stable() -> None:
    counts = [0, 120, 80, 95, 101, 130, 4, 0]
    report = evaluate_drift({"a": counts}, {"a": [3 * c for c in counts]})
    (f,) = report.features
    assert f.level == "stable" and f.js_distance == 0.0
    assert f.p_value == pytest.approx(1.0) and f.psi == pytest.approx(0.0)
    assert f.n_reference == sum(counts) and f.df is not None and f.df >= 1


def test_significant_but_immaterial_shift_is_not_drift() -> None:
    # a million values each side: a shift of PSI ~0.01 is overwhelmingly significant, yet not material
    ref = [100_000] * 10
    obs = [100_000 + (10_000 if i < 5 else -10_000) for i in range(10)]
    (f,) = evaluate_drift({"a": ref}, {"a": obs}).features
    assert f.p_adjusted is not None and f.p_adjusted < 1e-100
    assert f.psi is not None and f.psi < 0.05
    assert f.level == "stable"
    ref_watch = [100_000] * 10
    obs_watch = [100_000 + (30_000 if i < 5 else -30_000) for i in range(10)]  # PSI ~0.07
    assert evaluate_drift({"a": ref_watch}, {"a": obs_watch}).level == "watch"


def test_float_reference_is_goodness_of_fit() -> None:
    (f,) = evaluate_drift({"a": [0.5, 0.5]}, {"a": [300, 200]}).features
    assert f.n_reference is None
    assert f.statistic == pytest.approx(20.0)  # (50^2 / 250) * 2
    sample = evaluate_drift({"a": [500, 500]}, {"a": [300, 200]}, DriftConfig(reference_is_sample=False))
    assert sample.features[0].statistic == pytest.approx(20.0) and sample.features[0].n_reference is None


def test_goodness_of_fit_reads_a_small_references_noise_as_drift_at_large_n() -> None:
    # the reason references (samples of a few hundred rows) get the two-sample test
    rng = np.random.default_rng(5)
    fit_drift = two_sample_drift = 0
    for _ in range(20):
        reference, truth = _reference_and_truth(rng, n_ref=200)
        observed = {j: rng.multinomial(20_000, p).tolist() for j, p in enumerate(truth)}
        fit_drift += evaluate_drift(reference, observed, DriftConfig(reference_is_sample=False)).level == "drift"
        two_sample_drift += evaluate_drift(reference, observed).level == "drift"
    assert fit_drift >= 5
    assert two_sample_drift == 0


def test_mismatched_or_bad_histograms_are_contract_errors() -> None:
    with pytest.raises(ContractError, match="buckets"):
        evaluate_drift({"a": [1, 2, 3]}, {"a": [1, 2]})
    with pytest.raises(ContractError, match="non-negative"):
        evaluate_drift({"a": [1, 2]}, {"a": [1, -2]})
    with pytest.raises(ContractError):
        evaluate_drift({"a": [1.0, math.nan]}, {"a": [1, 2]})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_values": 0},
        {"alpha_drift": 0.0},
        {"alpha_drift": 0.05, "alpha_watch": 0.01},
        {"alpha_watch": 1.0},
        {"watch_min_psi": 0.2},
        {"watch_min_psi": -0.1},
        {"min_expected": 0.0},
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        DriftConfig(**kwargs)  # type: ignore[arg-type]


def test_output_drift_through_the_same_function_and_the_summary_line() -> None:
    stats = ReferenceStats(
        sample_count=2000,
        features=[FeatureReference(input="x", feature=12, edges=[0.5], counts=[1000, 1000])],
        outputs=[
            OutputReference(
                output="y",
                kind="classes",
                class_counts=[200] * 10,
                confidence_counts=[0, 0, 0, 0, 20, 40, 80, 160, 300, 400, 500, 500],
            ),
            OutputReference(output="z", kind="values", value_edges=[0.0], value_counts=[1, 1]),
        ],
    )
    assert len(CONFIDENCE_EDGES) + 1 == 12
    outputs = reference_outputs(stats)
    assert set(outputs) == {class_key("y"), confidence_key("y")}
    assert set(reference_inputs(stats)) == {DriftKey("feature", "x", 12)}
    rng = np.random.default_rng(1)
    prior = np.full(10, 0.1)
    prior[1], prior[7] = 0.25, 0.02  # one cohort sends far more ones, almost no sevens
    conf = np.array(outputs[confidence_key("y")], dtype=float) / 2000
    observed = {class_key("y"): rng.multinomial(3000, prior / prior.sum()).tolist()}
    observed[confidence_key("y")] = rng.multinomial(3000, conf).tolist()
    report = evaluate_drift(outputs, observed)
    assert report.level == "drift"
    assert [(f.label, f.level) for f in report.features] == [("y:class", "drift"), ("y:confidence", "stable")]
    line = report.summary()
    assert line.startswith("drift on y:class (p_adj ") and line.endswith(", n=3,000); 1 stable")
    as_json = report.as_json()
    assert as_json["level"] == "drift" and as_json["features"][0]["key"] == "y:class"
    inputs = evaluate_drift(reference_inputs(stats), {feature_key("x", 12): [650, 1350]})
    assert inputs.summary().startswith("drift on x[12] (p_adj ")
    assert str(DriftKey("feature", "x", None)) == "x"


def test_results_are_sorted_worst_first() -> None:
    reference = {k: [100, 100, 100, 100] for k in "abcd"}
    observed = {"a": [100, 100, 100, 100], "b": [40, 100, 100, 160], "c": [10, 10, 10, 10], "d": [0, 50, 150, 200]}
    report = evaluate_drift(reference, observed)
    assert [f.key for f in report.features] == ["d", "b", "a", "c"]
    assert [f.level for f in report.features] == ["drift", "drift", "stable", "insufficient"]
