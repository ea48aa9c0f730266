"""The blessing decision: a candidate release against the serving release, slice by slice (pure, no I/O).

An evaluation runs both releases' models on the same labelled rows, so each slice's metrics are *paired*
counts (:class:`SliceMetrics`): rows, rows each model got right, and rows only one of them got right. Every
number the decision reads is one of those integers, so the server recomputes the verdict from an uploaded
record exactly (:func:`decide`) and never trusts a client's ``blessed``.

Slices: ``overall`` (every labelled row), ``profile`` (one hardware profile, every cohort) and ``cohort``
(one cohort on one profile; models differ per profile, so cohorts are never merged across profiles).

Rules (:class:`Thresholds`; docs/evaluation.md gives the reasoning):

* ``overall`` needs at least ``min_rows`` labelled rows, else the candidate is not blessed: no blessing
  without evidence.
* A ``profile`` or ``cohort`` slice with fewer than ``min_slice_rows`` rows is *thin*: reported, never judged
  (its rows still count in its profile and overall); a warning names it.
* A judged slice fails when the candidate's accuracy is below ``min_accuracy`` (value threshold) or when
  it dropped by more than its change threshold against the baseline on the same rows: ``max_accuracy_drop``
  for ``overall`` and ``profile``, ``max_slice_accuracy_drop`` for ``cohort`` slices (smaller, so noisier).
* Blessed iff no judged slice failed. Decisions use the point estimates (as TFX's Evaluator does); the
  95% interval of each paired change is reported beside them so a reader sees a verdict inside the noise.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.states import ReasonCode

RECORD_FORMAT = "edgeota-evaluation/1"
Level = Literal["overall", "profile", "cohort"]
Z95 = 1.959963984540054


class EvaluationError(EdgeotaError):
    """An evaluation that cannot run or be trusted: bad dataset, bundle, release or thresholds."""

    default_reason = ReasonCode.MALFORMED_MESSAGE


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """What a candidate must meet to be blessed (see the module doc). ``None`` turns a threshold off."""

    min_accuracy: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    max_accuracy_drop: float | None = Field(default=0.01, ge=0, le=1, allow_inf_nan=False)
    max_slice_accuracy_drop: float | None = Field(default=0.03, ge=0, le=1, allow_inf_nan=False)
    min_slice_rows: int = Field(default=100, ge=1, le=10**9)
    min_rows: int = Field(default=200, ge=1, le=10**9)


class SliceMetrics(_Strict):
    """Paired counts of one slice. ``cohort`` is null on a ``cohort`` slice of devices without the cohort label.

    Invariant (checked): both-right rows = ``candidate_correct - candidate_only`` = ``baseline_correct -
    baseline_only`` >= 0, and no count exceeds ``rows``.
    """

    level: Level
    profile: str | None = Field(default=None, max_length=64)
    cohort: str | None = Field(default=None, max_length=256)
    rows: int = Field(ge=0, le=10**12)
    candidate_correct: int = Field(ge=0, le=10**12)
    baseline_correct: int = Field(ge=0, le=10**12)
    candidate_only: int = Field(ge=0, le=10**12, description="rows only the candidate got right")
    baseline_only: int = Field(ge=0, le=10**12, description="rows only the baseline got right")

    @model_validator(mode="after")
    def _consistent(self) -> SliceMetrics:
        both = self.candidate_correct - self.candidate_only
        if both < 0 or both != self.baseline_correct - self.baseline_only:
            raise ValueError(f"{self.name}: paired counts do not add up")
        if max(self.candidate_correct, self.baseline_correct) > self.rows:
            raise ValueError(f"{self.name}: more correct rows than rows")
        if (self.level == "overall") != (self.profile is None) or (self.level != "cohort" and self.cohort is not None):
            raise ValueError(f"{self.name}: level {self.level} does not match its profile and cohort")
        return self

    @property
    def name(self) -> str:
        if self.level == "overall":
            return "overall"
        if self.level == "profile":
            return f"profile={self.profile}"
        return f"profile={self.profile} cohort={'(none)' if self.cohort is None else self.cohort}"

    @property
    def key(self) -> tuple[str, str | None, str | None]:
        return (self.level, self.profile, self.cohort)


class SliceVerdict(_Strict):
    """How one slice was judged: ``passed``, ``failed`` or ``thin`` (too few rows to judge)."""

    level: Level
    profile: str | None
    cohort: str | None
    state: Literal["passed", "failed", "thin"]
    rows: int
    candidate_accuracy: float | None
    baseline_accuracy: float | None
    change: float | None = Field(description="candidate minus baseline accuracy on the same rows")
    change_ci95: tuple[float, float] | None = Field(description="95% interval of the paired change (normal approx.)")
    reasons: list[str]


class Verdict(_Strict):
    """Blessed or not, why (``reasons``: every failed rule), what was not judged (``warnings``), per slice."""

    blessed: bool
    reasons: list[str]
    warnings: list[str]
    slices: list[SliceVerdict]


def _rate(k: int, n: int) -> float | None:
    return k / n if n else None


def paired_change_ci(m: SliceMetrics) -> tuple[float, float] | None:
    """95% interval of (candidate - baseline) accuracy from the discordant pairs (Wald interval for paired
    proportions); None on an empty slice."""
    n = m.rows
    if n == 0:
        return None
    b, c = m.candidate_only, m.baseline_only
    d = (b - c) / n
    se = math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    return (max(-1.0, d - Z95 * se), min(1.0, d + Z95 * se))


def _judge(m: SliceMetrics, t: Thresholds) -> SliceVerdict:
    cand = _rate(m.candidate_correct, m.rows)
    base = _rate(m.baseline_correct, m.rows)
    change = None if cand is None or base is None else cand - base
    need = t.min_rows if m.level == "overall" else t.min_slice_rows
    reasons: list[str] = []
    state: Literal["passed", "failed", "thin"]
    if m.rows < need:
        state = "thin"
        if m.level == "overall":
            reasons.append(f"overall: {m.rows} labelled rows, fewer than the {need} needed to bless")
    else:
        drop_limit = t.max_slice_accuracy_drop if m.level == "cohort" else t.max_accuracy_drop
        assert cand is not None and change is not None  # rows >= need >= 1
        if t.min_accuracy is not None and cand < t.min_accuracy:
            reasons.append(f"{m.name}: accuracy {cand:.4f} below {t.min_accuracy:.4f} ({m.rows} rows)")
        # A tiny epsilon: a drop equal to the limit passes even when float subtraction rounds it up.
        if drop_limit is not None and -change > drop_limit + 1e-12:
            reasons.append(
                f"{m.name}: accuracy dropped {-change:.4f} vs baseline ({base:.4f} -> {cand:.4f}, {m.rows} rows), "
                f"more than {drop_limit:.4f}"
            )
        state = "failed" if reasons else "passed"
    return SliceVerdict(
        level=m.level,
        profile=m.profile,
        cohort=m.cohort,
        state=state,
        rows=m.rows,
        candidate_accuracy=cand,
        baseline_accuracy=base,
        change=change,
        change_ci95=paired_change_ci(m),
        reasons=reasons,
    )


def check_slices(metrics: list[SliceMetrics]) -> None:
    """Raise EvaluationError unless ``metrics`` hold exactly one ``overall`` slice, each slice once, and every
    aggregate is the sum of its parts (cohorts -> their profile, profiles -> overall)."""
    keys = [m.key for m in metrics]
    if len(keys) != len(set(keys)):
        raise EvaluationError("a slice is listed twice")
    overall = [m for m in metrics if m.level == "overall"]
    if len(overall) != 1:
        raise EvaluationError("metrics need exactly one overall slice")
    profiles = {m.profile: m for m in metrics if m.level == "profile"}
    fields = ("rows", "candidate_correct", "baseline_correct", "candidate_only", "baseline_only")

    def sums(parts: list[SliceMetrics]) -> tuple[int, ...]:
        return tuple(sum(getattr(p, f) for p in parts) for f in fields)

    for profile, agg in profiles.items():
        cohorts = [m for m in metrics if m.level == "cohort" and m.profile == profile]
        if sums(cohorts) != sums([agg]):
            raise EvaluationError(f"the cohort slices of profile {profile} do not add up to the profile")
    orphans = {m.profile for m in metrics if m.level == "cohort"} - set(profiles)
    if orphans:
        raise EvaluationError(f"cohort slices of profiles without a profile slice: {sorted(map(str, orphans))}")
    if sums(list(profiles.values())) != sums(overall):
        raise EvaluationError("the profile slices do not add up to the overall slice")


def decide(metrics: list[SliceMetrics], thresholds: Thresholds) -> Verdict:
    """The verdict for these slices under these thresholds (see the module doc). Deterministic; the same
    function runs in the CLI and, on upload, on the server.

    Raises:
        EvaluationError: the slices are not a consistent set (:func:`check_slices`).
    """
    check_slices(metrics)
    order = {"overall": 0, "profile": 1, "cohort": 2}
    ordered = sorted(metrics, key=lambda m: (order[m.level], m.profile or "", m.cohort is None, m.cohort or ""))
    slices = [_judge(m, thresholds) for m in ordered]
    reasons = [r for s in slices for r in s.reasons]
    warnings = [
        f"{m.name}: {m.rows} labelled rows, fewer than {thresholds.min_slice_rows}: not judged"
        for m, s in zip(ordered, slices, strict=True)
        if s.state == "thin" and m.level != "overall"
    ]
    return Verdict(blessed=not reasons, reasons=reasons, warnings=warnings, slices=slices)
