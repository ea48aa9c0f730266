"""Vectorised per-batch summaries behind :mod:`device_agent.telemetry`, on the contract's conventions.

Per-input-feature counts on the bundle's reference edges (plus NaN count, min, max, sum and sum of
squares) and output class counts and confidence histograms, exactly as
:mod:`edgeota_contract.telemetry` defines them: value x falls in bucket ``bisect_right(edges, x)``,
non-finite values are only counted as NaN. Adding two batches gives the same counts as adding their
concatenation; sums agree to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from device_agent._lazy import lazy_module
from edgeota_contract.telemetry import CONFIDENCE_EDGES, FeatureReference, FeatureSummary, OutputSummary

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")


def _counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def row_confidences(rows: np.ndarray) -> np.ndarray:
    """Per-row confidence by the contract's rule: the max of a probability row, else the max of its softmax."""
    if rows.size and rows.min() >= 0 and rows.max() <= 1 and (np.abs(rows.sum(axis=1) - 1) <= 1e-3).all():
        return np.asarray(rows.max(axis=1), dtype=np.float64)  # every row is a probability vector
    is_prob = (rows >= 0).all(axis=1) & (rows <= 1).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
    shifted = rows - rows.max(axis=1, keepdims=True)
    soft = np.exp(shifted)
    soft /= soft.sum(axis=1, keepdims=True)
    return np.asarray(np.where(is_prob, rows.max(axis=1), soft.max(axis=1)), dtype=np.float64)


class _InputSummary:
    """All reference features of one input, summarised with a handful of vectorised numpy calls per batch."""

    def __init__(self, name: str, refs: list[FeatureReference]) -> None:
        self.name = name
        self.refs = [r for r in refs if r.feature is not None]
        self.whole = [r for r in refs if r.feature is None]
        n = len(self.refs)
        width = max((len(r.edges) for r in self.refs), default=1)
        self.cols = np.asarray([r.feature for r in self.refs], dtype=np.int64)
        self.edges = np.full((n, width), np.inf)
        for i, r in enumerate(self.refs):
            self.edges[i, : len(r.edges)] = r.edges
        self.width = width + 1
        self.edges_t = np.ascontiguousarray(self.edges.T)[:, :, None]  # [edge, feature, 1]: one per pass
        with np.errstate(over="ignore"):  # edges beyond the float32 range become +-inf, then step inwards
            up = self.edges_t.astype(np.float32)  # nearest float32; step up where that fell below the edge
        self.edges32 = np.where(up < self.edges_t, np.nextafter(up, np.float32(np.inf)), up).astype(np.float32)
        self.offsets = np.arange(n, dtype=np.intp) * self.width
        self.counts = np.zeros((n, self.width), dtype=np.int64)
        self.nan = np.zeros(n, dtype=np.int64)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.sum = np.zeros(n)
        self.sum_sq = np.zeros(n)
        w = len(self.whole)
        self.whole_counts = [np.zeros(len(r.edges) + 1, dtype=np.int64) for r in self.whole]
        self.whole_stats = np.zeros((w, 3))  # nan count, sum, sum of squares
        self.whole_min = np.full(w, np.inf)
        self.whole_max = np.full(w, -np.inf)

    def add(self, arrays: list[np.ndarray]) -> None:
        """Add a batch: each array is one request's input, ``[N, ...]`` (0-d arrays are skipped)."""
        if self.refs:
            # The contract's feature view: [N, ...] flattened row-major to [N, F] (edgeota_contract.telemetry).
            views = [a.reshape(len(a), -1) for a in arrays if a.ndim]
            width = views[0].shape[1] if views else 0
            same = [v for v in views if v.shape[1] == width]
            if same and (self.cols < width).all():
                self._add_columns((same[0] if len(same) == 1 else np.concatenate(same)).T[self.cols])
        if self.whole:
            flat = np.concatenate([a.ravel() for a in arrays]).astype(np.float64, copy=False)
            finite = np.isfinite(flat)
            vals = flat[finite]
            for i, r in enumerate(self.whole):
                self.whole_stats[i, 0] += flat.size - vals.size
                if vals.size:
                    self.whole_counts[i] += _counts(np.asarray(r.edges), vals)
                    self.whole_stats[i, 1] += vals.sum()
                    self.whole_stats[i, 2] += np.dot(vals, vals)
                    self.whole_min[i] = min(self.whole_min[i], vals.min())
                    self.whole_max[i] = max(self.whole_max[i], vals.max())

    def _add_columns(self, raw: np.ndarray) -> None:
        """Add ``raw``: the reference columns, transposed to ``[feature, row]`` so every pass runs along rows."""
        v = raw.astype(np.float64, copy=False)
        sums = v.sum(axis=1)
        if np.isfinite(sums).all():  # a finite sum means every value is finite: the common, cheaper path
            self.sum += sums
            self.sum_sq += np.einsum("ij,ij->i", v, v)
            self.min = np.minimum(self.min, raw.min(axis=1, initial=np.inf))
            self.max = np.maximum(self.max, raw.max(axis=1, initial=-np.inf))
            # float32 data compares exactly against edges rounded up to float32 (x >= e <=> x >= ceil32(e))
            f32 = raw.dtype == np.float32
            self._add_buckets(raw if f32 else v, self.edges32 if f32 else self.edges_t, raw.shape[1])
            return
        finite = np.isfinite(v)
        self.nan += (~finite).sum(axis=1)
        zeroed = np.where(finite, v, 0.0)
        self.sum += zeroed.sum(axis=1)
        self.sum_sq += (zeroed * zeroed).sum(axis=1)
        self.min = np.minimum(self.min, np.where(finite, v, np.inf).min(axis=1, initial=np.inf))
        self.max = np.maximum(self.max, np.where(finite, v, -np.inf).max(axis=1, initial=-np.inf))
        self._add_buckets(np.where(finite, v, np.nan), self.edges_t, finite.sum(axis=1))  # NaN >= e is False

    def _add_buckets(self, v: np.ndarray, edges_t: np.ndarray, finite: int | np.ndarray) -> None:
        """Count every finite value of ``v`` ``[feature, row]`` in bucket bisect_right(its feature's edges, x).

        Non-finite values must be NaN. With ``ge[e]`` = how many values are >= edge e (per feature; edges
        ascending, padded with +inf), bucket 0 holds ``finite - ge[0]``, bucket b ``ge[b-1] - ge[b]`` and
        the last bucket ``ge[-1]``: one comparison pass and one count per edge, no per-value index.
        """
        if len(edges_t) > 32:  # long edge lists: one binary search per feature beats one pass per edge
            idx = np.stack([np.searchsorted(self.edges[j], v[j], side="right") for j in range(len(v))])
            flat = (idx + self.offsets[:, None])[~np.isnan(v)]
            self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
            return
        ge = np.empty((len(edges_t), len(v)), dtype=np.int64)
        hits = np.empty(v.shape, dtype=np.bool_)
        narrow = np.uint16 if v.shape[1] < 65536 else np.int64  # a narrow accumulator sums faster, cannot overflow
        for e, column in enumerate(edges_t):
            np.greater_equal(v, column, out=hits)
            ge[e] = hits.view(np.uint8).sum(axis=1, dtype=narrow)
        self.counts[:, 0] += finite - ge[0]
        self.counts[:, 1:-1] += (ge[:-1] - ge[1:]).T
        self.counts[:, -1] += ge[-1]

    def summaries(self) -> list[FeatureSummary]:
        per_feature = [
            (r, self.counts[i, : len(r.edges) + 1], self.nan[i], self.min[i], self.max[i], self.sum[i], self.sum_sq[i])
            for i, r in enumerate(self.refs)
        ]
        whole = [
            (
                r,
                self.whole_counts[i],
                *self.whole_stats[i, :1],
                self.whole_min[i],
                self.whole_max[i],
                *self.whole_stats[i, 1:],
            )
            for i, r in enumerate(self.whole)
        ]
        return [
            FeatureSummary(
                input=r.input,
                feature=r.feature,
                edges=list(r.edges),
                counts=[int(c) for c in counts],
                nan_count=int(nan),
                min=float(lo) if lo != np.inf else None,
                max=float(hi) if lo != np.inf else None,
                sum=float(total),
                sum_sq=float(total_sq),
            )
            for r, counts, nan, lo, hi, total, total_sq in per_feature + whole
        ]


@dataclass
class _Output:
    name: str
    classes: int | None
    copied: bool = True  # False for string outputs: nothing to summarise
    class_counts: np.ndarray | None = None
    confidence_counts: np.ndarray | None = None
    nan_count: int = 0

    def add(self, value: np.ndarray) -> None:
        floating = np.issubdtype(value.dtype, np.floating)
        all_finite = not floating or bool(np.isfinite(value.sum(dtype=np.float64)))  # finite sum: all finite
        if not all_finite:
            self.nan_count += int((~np.isfinite(value)).sum())
        if self.classes is None or value.ndim == 0 or value.shape[-1] != self.classes:
            return
        probs = value.reshape(-1, self.classes).astype(np.float64, copy=False)
        if not all_finite:
            probs = probs[np.isfinite(probs).all(axis=1)]
        if probs.size == 0:
            return
        if self.class_counts is None or self.confidence_counts is None:
            self.class_counts = np.zeros(self.classes, dtype=np.int64)
            self.confidence_counts = np.zeros(len(CONFIDENCE_EDGES) + 1, dtype=np.int64)
        self.class_counts += np.bincount(probs.argmax(axis=1), minlength=self.classes)
        self.confidence_counts += _counts(np.asarray(CONFIDENCE_EDGES), row_confidences(probs))

    def add_batch(self, arrays: list[np.ndarray]) -> None:
        if self.classes is not None and all(a.ndim and a.shape[-1] == self.classes for a in arrays):
            self.add(np.concatenate([a.reshape(-1, self.classes) for a in arrays]))
        else:
            for a in arrays:
                self.add(a)

    def summary(self) -> OutputSummary:
        return OutputSummary(
            output=self.name,
            class_counts=None if self.class_counts is None else [int(c) for c in self.class_counts],
            confidence_counts=None if self.confidence_counts is None else [int(c) for c in self.confidence_counts],
            nan_count=self.nan_count,
        )
