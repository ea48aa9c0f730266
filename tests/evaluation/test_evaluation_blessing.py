"""The blessing decision (pure): value and change thresholds, per-cohort slices, thin slices, consistency."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from edgeota.evaluation.blessing import EvaluationError, SliceMetrics, Thresholds, decide, paired_change_ci


def sl(level: str, profile: str | None, cohort: str | None, rows: int, cand: int, base: int, c_only: int = 0):  # type: ignore[no-untyped-def]
    """A slice whose both-right rows are ``cand - c_only`` (so ``base_only = base - cand + c_only``)."""
    return SliceMetrics(
        level=level,  # type: ignore[arg-type]
        profile=profile,
        cohort=cohort,
        rows=rows,
        candidate_correct=cand,
        baseline_correct=base,
        candidate_only=c_only,
        baseline_only=base - (cand - c_only),
    )


def fleet(north: tuple[int, int, int], south: tuple[int, int, int]) -> list[SliceMetrics]:
    """One profile ``x86`` with cohorts north and south: (rows, candidate right, baseline right) each; the
    candidate is right only where the baseline is (no candidate-only rows)."""
    n, s = north, south
    return [
        sl("overall", None, None, n[0] + s[0], n[1] + s[1], n[2] + s[2]),
        sl("profile", "x86", None, n[0] + s[0], n[1] + s[1], n[2] + s[2]),
        sl("cohort", "x86", "north", *n),
        sl("cohort", "x86", "south", *s),
    ]


def test_equal_models_are_blessed_and_each_slice_passes() -> None:
    verdict = decide(fleet((300, 270, 270), (300, 280, 280)), Thresholds())
    assert verdict.blessed and verdict.reasons == [] and verdict.warnings == []
    assert [s.state for s in verdict.slices] == ["passed"] * 4
    assert verdict.slices[0].change == 0.0


def test_value_threshold_fails_the_slices_below_it() -> None:
    verdict = decide(fleet((300, 240, 240), (300, 290, 290)), Thresholds(min_accuracy=0.85))
    assert not verdict.blessed
    failed = [(s.level, s.cohort) for s in verdict.slices if s.state == "failed"]
    assert failed == [("cohort", "north")]
    assert "accuracy 0.8000 below 0.8500" in verdict.reasons[0]


def test_a_drop_on_one_cohort_fails_it_though_overall_stays_within_its_limit() -> None:
    # north drops 12/300 = 0.04 (> 0.03 per-cohort limit); overall drops 12/600 = 0.02 (> 0.01): both named.
    verdict = decide(fleet((300, 258, 270), (300, 280, 280)), Thresholds())
    assert not verdict.blessed
    assert any(r.startswith("profile=x86 cohort=north: accuracy dropped 0.0400") for r in verdict.reasons)
    assert any(r.startswith("overall: accuracy dropped 0.0200") for r in verdict.reasons)
    # Loosen the overall limit only: the cohort still blocks.
    verdict = decide(fleet((300, 258, 270), (300, 280, 280)), Thresholds(max_accuracy_drop=0.05))
    assert [s.cohort for s in verdict.slices if s.state == "failed"] == ["north"]


def test_a_drop_exactly_at_the_limit_passes() -> None:
    verdict = decide(fleet((300, 261, 270), (300, 289, 289)), Thresholds(max_accuracy_drop=0.015))
    assert verdict.slices[2].change == pytest.approx(-0.03)
    assert verdict.blessed, verdict.reasons


def test_thin_slices_are_reported_not_judged_and_still_count_overall() -> None:
    # south has 20 rows and drops 10 of them: not judged per cohort (thin), but it pulls overall down.
    verdict = decide(fleet((400, 380, 380), (20, 10, 20)), Thresholds(max_accuracy_drop=0.05))
    south = next(s for s in verdict.slices if s.cohort == "south")
    assert south.state == "thin" and south.reasons == []
    assert verdict.warnings == ["profile=x86 cohort=south: 20 labelled rows, fewer than 100: not judged"]
    assert verdict.blessed  # overall drop 10/420 = 0.024 <= 0.05
    assert not decide(fleet((400, 380, 380), (20, 10, 20)), Thresholds()).blessed  # 0.024 > 0.01 overall


def test_too_few_labelled_rows_overall_is_never_blessed() -> None:
    verdict = decide(fleet((60, 55, 55), (60, 55, 55)), Thresholds(min_rows=200, min_slice_rows=10))
    assert not verdict.blessed
    assert verdict.reasons == ["overall: 120 labelled rows, fewer than the 200 needed to bless"]


def test_turned_off_change_threshold_judges_value_only() -> None:
    t = Thresholds(max_accuracy_drop=None, max_slice_accuracy_drop=None, min_accuracy=0.5)
    assert decide(fleet((300, 200, 290), (300, 200, 290)), t).blessed


def test_paired_interval_comes_from_the_discordant_rows() -> None:
    m = sl("overall", None, None, 400, 380, 370, c_only=20)  # b = 20, c = 10
    half = 1.959964 * (30 - 10**2 / 400) ** 0.5 / 400  # Wald interval of paired proportions
    assert paired_change_ci(m) == pytest.approx((10 / 400 - half, 10 / 400 + half))
    same = sl("overall", None, None, 100, 90, 90)
    assert paired_change_ci(same) == (0.0, 0.0)


@pytest.mark.parametrize(
    "fields",
    [
        {"rows": 10, "candidate_correct": 11, "baseline_correct": 5, "candidate_only": 6, "baseline_only": 0},
        {"rows": 10, "candidate_correct": 5, "baseline_correct": 5, "candidate_only": 1, "baseline_only": 0},
        {"rows": 10, "candidate_correct": 5, "baseline_correct": 5, "candidate_only": 6, "baseline_only": 6},
        {"rows": -1, "candidate_correct": 0, "baseline_correct": 0, "candidate_only": 0, "baseline_only": 0},
    ],
)
def test_inconsistent_counts_are_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        SliceMetrics(level="overall", **fields)


def test_slices_that_do_not_add_up_are_refused() -> None:
    metrics = fleet((300, 270, 270), (300, 280, 280))
    with pytest.raises(EvaluationError, match="cohort slices of profile x86 do not add up"):
        decide([*metrics[:3], sl("cohort", "x86", "south", 300, 281, 281)], Thresholds())
    with pytest.raises(EvaluationError, match="exactly one overall"):
        decide(metrics[1:], Thresholds())
    with pytest.raises(EvaluationError, match="listed twice"):
        decide([*metrics, metrics[3]], Thresholds())
    with pytest.raises(EvaluationError, match="profile slices do not add up"):
        decide([sl("overall", None, None, 10, 5, 5), *metrics[1:]], Thresholds())
    with pytest.raises(ValidationError):  # a cohort slice without its profile
        SliceMetrics(
            level="overall",
            profile="x86",
            rows=0,
            candidate_correct=0,
            baseline_correct=0,
            candidate_only=0,
            baseline_only=0,
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"min_accuracy": 1.5},
        {"max_accuracy_drop": -0.1},
        {"max_slice_accuracy_drop": float("nan")},
        {"min_slice_rows": 0},
        {"min_rows": 0},
        {"unknown": 1},
    ],
)
def test_bad_thresholds_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        Thresholds(**bad)
