"""Drift rule benchmark: false alarms on in-distribution traffic and detection delay on shifted data.

Simulates what a rollout gate sees on the digits model: 64 input features (pixels / 16, as the example
model is trained), reference histograms made as the packager makes them (per feature, edges at the
distinct 10th..90th percentiles of the calibration rows, rounded to 6 significant digits; counts on
those edges) from the example's calibration set (``CALIBRATION_SAMPLES`` = 200 rows of a 75% training
split, a new draw per run), and device windows of ``REQUESTS_PER_WINDOW`` requests whose inputs are
summarised with probability ``FEATURE_SAMPLE_RATE`` (the agent's default), i.e. ~23 values per feature
per window. Requests draw whole digit rows from the full scikit-learn digits set, so features are as
correlated as in real images. The gate evaluates the cumulative counts after every window, 1..N.
Output drift uses each row's true label as the prediction (a stand-in for the ~97% accurate example
model; outputs are summarised on every request, not a sample) against the calibration rows' labels.

Rules judging the same simulated counts in the same run:

- ``new``: :func:`ota_server.drift.evaluate_drift` with its defaults;
- ``new_min_values_100`` / ``_50``: the same with a lower minimum (sensitivity of that default);
- ``old``: the max PSI over the 64 features, ``> 0.25`` drift ("act"), ``> 0.1`` watch, from the first
  window (the old gate's ``min_telemetry_requests`` of 100 is met by every window);
- ``new_output`` / ``old_output``: the class distribution by the new rule / by PSI > 0.25.

Scenarios: in distribution (false alarms: share of gate evaluations at ``drift``, goal < 1%; share of
runs with any ``drift`` within N windows), one feature of a share of the requests moved by one standard deviation
(as the fleet simulator's ``Drift`` moves features; a share because pixels take few values, so a
whole-population move is all or nothing on the packager's bins) from the first window (detection delay
in windows until ``drift``; whether the shifted feature is the one named), and a cohort sending one
digit four times as often (output drift). Also the reason for the two-sample test: the same counts judged with the
reference taken as exact probabilities (goodness of fit) at the last window. Goals are reported as
met/missed, never asserted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ota_server.drift import DriftConfig, evaluate_drift, psi
from packager.examples.digits import CALIBRATION_SAMPLES

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

REQUESTS_PER_WINDOW = 370
FEATURE_SAMPLE_RATE = 1 / 16
SHIFTED_FEATURE = 43  # pixel (5, 3): spread over its range, so a shift moves mass between several bins
SHIFT_STD = 1.0  # the moved requests' value of that feature moves by this many standard deviations (~0.4)
SHIFTED_SHARES = (0.3, 0.5, 0.8)  # share of requests moved: graded effects (pixels are coarse, bins coarser)
PRIOR_SHIFT_DIGIT = 1  # the output scenario's cohort sends this digit ...
PRIOR_SHIFT_WEIGHT = 4.0  # ... four times as often (~31% of requests instead of ~10%)
LARGER_REFERENCE_ROWS = 1000  # what a bundle packaged with more calibration rows would ship (max 1,347 here)
GOAL_FALSE_ALARM_MAX = 0.01
FEATURE_RULES: dict[str, DriftConfig | None] = {
    "new": DriftConfig(),
    "new_min_values_100": DriftConfig(min_values=100),
    "new_min_values_50": DriftConfig(min_values=50),
    "old": None,
}


@dataclass(frozen=True)
class Reference:
    """One packaging run's reference: per feature the packager's edges and counts; class counts."""

    edges: list[FloatArray]
    counts: dict[int, list[int]]
    classes: list[int]


@dataclass(frozen=True)
class Traffic:
    """What devices send: rows of a pool (maybe moved), drawn with optional per-row weights, and their labels."""

    pool: FloatArray
    labels: IntArray
    weights: FloatArray | None = None


def digits() -> tuple[FloatArray, IntArray]:
    """scikit-learn's digits as [1797, 64] pixels in [0, 1] (the example model's scaling) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return np.asarray(data.data / 16.0, dtype=np.float64), np.asarray(data.target, dtype=np.int64)


def packager_edges(values: FloatArray) -> FloatArray:
    """The packager's rule for one feature: distinct 10th..90th percentiles, 6 significant digits."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.array([0.0])
    qs = np.percentile(finite, np.arange(10, 100, 10))
    return np.array(sorted({float(f"{q:.6g}") for q in qs}), dtype=np.float64)


def make_reference(pool: FloatArray, labels: IntArray, rng: np.random.Generator, rows: int) -> Reference:
    """The calibration rows of one packaging run: ``rows`` rows of a 75% training split."""
    train = rng.permutation(len(pool))[: int(len(pool) * 0.75)]
    chosen = rng.choice(train, rows, replace=False)
    calib = pool[chosen]
    edges = [packager_edges(calib[:, j]) for j in range(pool.shape[1])]
    counts = {
        j: np.bincount(np.searchsorted(e, calib[:, j], side="right"), minlength=len(e) + 1).tolist()
        for j, e in enumerate(edges)
    }
    return Reference(edges, counts, np.bincount(labels[chosen], minlength=10).tolist())


def _old_level(worst_psi: float) -> str:
    return "drift" if worst_psi > 0.25 else "watch" if worst_psi > 0.1 else "stable"


def simulate_run(traffic: Traffic, ref: Reference, windows: int, seed: int) -> list[dict[str, Any]]:
    """One rollout's gate evaluations after windows 1..``windows``: every rule's level and what it named."""
    rng = np.random.default_rng(seed)
    sizes = np.array([len(e) + 1 for e in ref.edges])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total = int(offsets[-1])
    table = np.stack([np.searchsorted(e, traffic.pool[:, j], side="right") for j, e in enumerate(ref.edges)], axis=1)
    table = table + offsets[:-1]
    probabilities = None if traffic.weights is None else traffic.weights / traffic.weights.sum()
    cumulative = np.zeros(total, dtype=np.int64)
    classes = np.zeros(10, dtype=np.int64)
    out: list[dict[str, Any]] = []
    for w in range(1, windows + 1):
        rows = rng.choice(len(traffic.pool), REQUESTS_PER_WINDOW, p=probabilities)
        sampled = rows[rng.random(REQUESTS_PER_WINDOW) < FEATURE_SAMPLE_RATE]  # the agent's uniform draw
        cumulative += np.bincount(table[sampled].ravel(), minlength=total)
        classes += np.bincount(traffic.labels[rows], minlength=10)
        observed = {j: cumulative[offsets[j] : offsets[j + 1]].tolist() for j in ref.counts}
        levels: dict[str, str] = {}
        named: dict[str, list[Any]] = {}
        worst_psi = max(psi(ref.counts[j], observed[j]) for j in ref.counts)  # 0.0 for empty histograms
        for name, config in FEATURE_RULES.items():
            if config is None:
                levels[name] = _old_level(worst_psi)
                continue
            report = evaluate_drift(ref.counts, observed, config)
            levels[name] = report.level
            named[name] = [f.key for f in report.of_level("drift")]
        levels["new_output"] = evaluate_drift({"class": ref.classes}, {"class": classes.tolist()}).level
        levels["old_output"] = _old_level(psi(ref.classes, classes))
        out.append({"window": w, "levels": levels, "named": named, "max_psi": worst_psi, "observed": observed})
    return out


def _rate(hits: int, total: int) -> float | None:
    return hits / total if total else None


def _values(windows: float) -> int:
    return round(windows * REQUESTS_PER_WINDOW * FEATURE_SAMPLE_RATE)


def false_alarms(runs: list[list[dict[str, Any]]], rule: str) -> dict[str, Any]:
    evaluations = [ev["levels"][rule] for run in runs for ev in run]
    verdicts = [lv for lv in evaluations if lv != "insufficient"]
    rate = _rate(evaluations.count("drift"), len(evaluations))
    return {
        "evaluations": len(evaluations),
        "evaluations_with_verdict": len(verdicts),
        "drift_rate_per_evaluation": rate,
        "drift_rate_per_evaluation_with_verdict": _rate(verdicts.count("drift"), len(verdicts)),
        "watch_or_drift_rate_per_evaluation": _rate(
            sum(lv in ("drift", "watch") for lv in evaluations), len(evaluations)
        ),
        "runs_with_any_drift": _rate(sum(any(ev["levels"][rule] == "drift" for ev in run) for run in runs), len(runs)),
        "goal_per_evaluation": "met" if rate is not None and rate < GOAL_FALSE_ALARM_MAX else "missed",
    }


def detection(
    runs: list[list[dict[str, Any]]], rule: str, hit: Callable[[str], bool], per_window: int | None = None
) -> dict[str, Any]:
    """Windows until ``hit`` first holds; ``per_window``: values per window (default: a feature's sample)."""
    delays = [next((ev["window"] for ev in run if hit(ev["levels"][rule])), None) for run in runs]
    found = [d for d in delays if d is not None]
    return {
        "detected_within_run": _rate(len(found), len(runs)),
        "median_windows": float(np.median(found)) if found else None,
        "p90_windows": float(np.percentile(found, 90)) if found else None,
        "median_values": (
            (round(float(np.median(found)) * per_window) if per_window else _values(float(np.median(found))))
            if found
            else None
        ),
    }


def _runs(
    traffic: Traffic, pool: FloatArray, labels: IntArray, seeds: int, windows: int, base: int, rows: int
) -> tuple[list[list[dict[str, Any]]], list[Reference]]:
    runs, refs = [], []
    for seed in range(seeds):
        ref = make_reference(pool, labels, np.random.default_rng(base + seed), rows)
        refs.append(ref)
        runs.append(simulate_run(traffic, ref, windows, base + 100_000 + seed))
    return runs, refs


def in_distribution(pool: FloatArray, labels: IntArray, seeds: int, windows: int, rows: int) -> dict[str, Any]:
    runs, refs = _runs(Traffic(pool, labels), pool, labels, seeds, windows, 10_000, rows)
    gof = DriftConfig(reference_is_sample=False)
    gof_drift = sum(
        evaluate_drift(ref.counts, run[-1]["observed"], gof).level == "drift"
        for run, ref in zip(runs, refs, strict=True)
    )
    checkpoints = sorted({1, 5, 9, 20, windows})
    result: dict[str, Any] = {"reference_rows": rows, "runs": seeds, "windows_per_run": windows}
    for rule in (*FEATURE_RULES, "new_output", "old_output"):
        result[rule] = false_alarms(runs, rule)
    result["old"]["drift_at_first_window"] = _rate(sum(run[0]["levels"]["old"] == "drift" for run in runs), seeds)
    result["old"]["max_psi_median_by_window"] = {
        str(w): {"values_per_feature": _values(w), "median": float(np.median([run[w - 1]["max_psi"] for run in runs]))}
        for w in checkpoints
    }
    result["goodness_of_fit_drift_rate_at_last_window"] = {
        "values_per_feature": _values(windows),
        "rate": _rate(gof_drift, seeds),
    }
    return result


def shifted_feature(
    pool: FloatArray, labels: IntArray, share: float, seeds: int, windows: int, rows: int
) -> dict[str, Any]:
    moved = pool.copy()
    moved[:, SHIFTED_FEATURE] += SHIFT_STD * pool[:, SHIFTED_FEATURE].std()
    weights = np.concatenate([np.full(len(pool), 1.0 - share), np.full(len(pool), share)])
    traffic = Traffic(np.concatenate([pool, moved]), np.concatenate([labels, labels]), weights)
    runs, refs = _runs(traffic, pool, labels, seeds, windows, 30_000, rows)
    true_psi = []  # the shift's size on each reference's bins, over the whole digits set (infinite traffic)
    for ref in refs:
        e = ref.edges[SHIFTED_FEATURE]
        before = np.bincount(np.searchsorted(e, pool[:, SHIFTED_FEATURE], side="right"), minlength=len(e) + 1)
        after = np.bincount(np.searchsorted(e, moved[:, SHIFTED_FEATURE], side="right"), minlength=len(e) + 1)
        true_psi.append(psi(before, (1.0 - share) * before + share * after))
    result: dict[str, Any] = {
        "reference_rows": rows,
        "shift_std": SHIFT_STD,
        "share_of_requests_moved": share,
        "feature": SHIFTED_FEATURE,
        "runs": seeds,
        "windows_per_run": windows,
        "true_psi_quartiles": [round(float(q), 4) for q in np.percentile(true_psi, [25, 50, 75])],
    }
    for rule in FEATURE_RULES:
        result[rule] = detection(runs, rule, lambda lv: lv == "drift")
    result["new_watch_or_drift"] = detection(runs, "new", lambda lv: lv in ("drift", "watch"))
    first = [next((ev for ev in run if ev["levels"]["new"] == "drift"), None) for run in runs]
    hits = [ev for ev in first if ev is not None]
    result["new"]["shifted_feature_named"] = _rate(sum(SHIFTED_FEATURE in ev["named"]["new"] for ev in hits), len(hits))
    result["new"]["other_features_also_drift"] = _rate(
        sum(any(k != SHIFTED_FEATURE for k in ev["named"]["new"]) for ev in hits), len(hits)
    )
    return result


def class_prior_shift(pool: FloatArray, labels: IntArray, seeds: int, windows: int, rows: int) -> dict[str, Any]:
    weights = np.where(labels == PRIOR_SHIFT_DIGIT, PRIOR_SHIFT_WEIGHT, 1.0)
    runs, _ = _runs(Traffic(pool, labels, weights), pool, labels, seeds, windows, 50_000, rows)
    share = float(weights[labels == PRIOR_SHIFT_DIGIT].sum() / weights.sum())
    result: dict[str, Any] = {
        "reference_rows": rows,
        "digit": PRIOR_SHIFT_DIGIT,
        "share_of_requests": round(share, 3),
        "runs": seeds,
        "windows_per_run": windows,
    }
    for rule in ("new_output", "old_output", "new", "old"):
        result[rule] = detection(
            runs, rule, lambda lv: lv == "drift", per_window=REQUESTS_PER_WINDOW if "output" in rule else None
        )
    return result


def run(results_dir: Path, quick: bool) -> dict[str, Any]:
    """Simulate every rule on the same data; write ``results_dir/"drift.json"`` and return its content."""
    started = time.perf_counter()
    pool, labels = digits()
    null_seeds, shift_seeds, windows = (12, 6, 24) if quick else (150, 30, 48)
    big = LARGER_REFERENCE_ROWS
    result: dict[str, Any] = {
        "setting": {
            "features": pool.shape[1],
            "reference_rows": CALIBRATION_SAMPLES,
            "larger_reference_rows": big,
            "requests_per_window": REQUESTS_PER_WINDOW,
            "feature_sample_rate": FEATURE_SAMPLE_RATE,
            "values_per_feature_per_window": REQUESTS_PER_WINDOW * FEATURE_SAMPLE_RATE,
            "config": asdict(DriftConfig()),
            "quick": quick,
        },
        "in_distribution": in_distribution(pool, labels, null_seeds, windows, CALIBRATION_SAMPLES),
        "in_distribution_larger_reference": in_distribution(pool, labels, null_seeds // 3, windows, big),
        "shifted_feature": [
            shifted_feature(pool, labels, s, shift_seeds, windows, rows)
            for rows in (CALIBRATION_SAMPLES, big)
            for s in SHIFTED_SHARES
        ],
        "class_prior_shift": class_prior_shift(pool, labels, shift_seeds, windows, CALIBRATION_SAMPLES),
    }
    null = result["in_distribution"]
    result["goals"] = {
        "false_alarm_rate_per_evaluation_max": GOAL_FALSE_ALARM_MAX,
        "new": null["new"]["goal_per_evaluation"],
        "old": null["old"]["goal_per_evaluation"],
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "drift.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    print(json.dumps(run(args.out, args.quick), indent=2))
