"""Vectorised batch summaries behind :mod:`device_agent.telemetry.recorder`, on the contract's conventions.

Per-input-feature counts on the bundle's reference edges (plus NaN count, min, max, sum and sum of
squares) and output class counts and confidence histograms, exactly as
:mod:`edgeota_contract.telemetry` defines them: value x falls in bucket ``bisect_right(edges, x)``,
non-finite values are only counted as NaN.

Guarantee: summarising rows in batches gives exactly (bit for bit) what summarising them one
request at a time gives. Counts, minima and maxima do not depend on the order; sums and sums of
squares are accumulated row by row in recording order (``acc += float(x)`` and
``acc += float(x) * float(x)`` in float64), which a numpy reduction over axis 0 of a row-major
``[rows, features]`` matrix does (it adds whole rows, it does not sum pairwise), with the running
total as the first row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from edgeota_contract.telemetry import CONFIDENCE_EDGES, FeatureReference, FeatureSummary, OutputSummary

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

CHUNK_ROWS = 1024
"""Rows summarised per numpy pass: the scratch arrays of a chunk stay in a core's L2 cache."""
_SUPER_ROWS = 16
"""Rows compared in one go against edges repeated as often (longer inner loops, half the time)."""
_LANE_FOLDS = 7
"""Halving folds of 0/1 bytes that fit a byte lane (2**7 = 128 <= 255): see :func:`_column_counts`."""


_FREE: list[dict[str, np.ndarray]] = []
_KEEP_POOLS = 4


@contextmanager
def _borrowed() -> Iterator[dict[str, np.ndarray]]:
    """Scratch arrays to reuse (fresh 0.5 MB arrays cost page faults on every batch). At most
    ``_KEEP_POOLS`` sets are kept, whatever the number of threads or agents in the process; list
    pop and append are atomic, so two summarising threads never share a set."""
    try:
        pool = _FREE.pop()
    except IndexError:
        pool = {}
    try:
        yield pool
    finally:
        if len(_FREE) < _KEEP_POOLS:
            _FREE.append(pool)


def _take(pool: dict[str, np.ndarray], name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A C-contiguous ``shape`` array of ``dtype`` from ``pool`` (contents undefined)."""
    size = math.prod(shape)
    buf = pool.get(name)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = pool[name] = np.empty(size, dtype=dtype)
    return np.asarray(buf[:size].reshape(shape))


def _counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(edges, values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def row_confidences(rows: np.ndarray) -> np.ndarray:
    """Per-row confidence by the contract's rule: the max of a probability row (values in [0, 1], sum
    within 1e-3 of 1), else the max of its softmax, i.e. ``1 / sum(exp(x - max(x)))``.

    Every row's result depends on that row alone, computed the same way with one row or a thousand:
    for up to ``_COLUMN_LOOP_CLASSES`` classes column by column (long passes over all rows; the row
    sum adds classes in order), for more with row-wise reductions.
    """
    if rows.shape[1] > _COLUMN_LOOP_CLASSES:
        return _row_confidences_wide(rows)
    cols = np.ascontiguousarray(rows.T, dtype=np.float64)
    top, low, total = cols[0].copy(), cols[0].copy(), cols[0].copy()
    for c in cols[1:]:
        np.maximum(top, c, out=top)
        np.minimum(low, c, out=low)
        total += c
    is_prob = (low >= 0) & (top <= 1) & (np.abs(total - 1) <= 1e-3)
    if is_prob.all():
        return np.asarray(top)
    den = np.exp(cols[0] - top)
    for c in cols[1:]:
        den += np.exp(c - top)
    return np.asarray(np.where(is_prob, top, 1.0 / den), dtype=np.float64)


_COLUMN_LOOP_CLASSES = 32


def _row_confidences_wide(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64, copy=False)
    is_prob = (rows >= 0).all(axis=1) & (rows <= 1).all(axis=1) & (np.abs(rows.sum(axis=1) - 1) <= 1e-3)
    top = rows.max(axis=1)
    den = np.exp(rows - top[:, None]).sum(axis=1)
    return np.asarray(np.where(is_prob, top, 1.0 / den), dtype=np.float64)


def _fold(ufunc: Any, v: np.ndarray) -> np.ndarray:
    """``ufunc.reduce(v, axis=0)`` for an order-free ufunc (minimum, maximum) by halving folds: long
    contiguous passes instead of one short pass per row."""
    rows = len(v)
    top = 1 << (rows.bit_length() - 1)  # the largest power of two <= rows
    m = v[:top]
    if top < rows:
        m = m.copy()
        ufunc(m[: rows - top], v[top:], out=m[: rows - top])
    while len(m) > 1:
        half = len(m) // 2
        m = ufunc(m[:half], m[half:])
    return np.asarray(m[0])


def _column_counts(ge: np.ndarray, rows: int) -> np.ndarray:
    """Per-column counts of True in ``ge`` (bool ``[edges, rows_pow2, cols_mult8]``, zero padded).

    SWAR: eight 0/1 bytes ride in one uint64, so adding two row blocks adds eight columns at once;
    up to 128 rows fit a byte lane before the rest is summed in int64.
    """
    lanes = ge.view(np.uint64)
    n = lanes.shape[1]
    folds = 0
    while n > 1 and folds < _LANE_FOLDS:
        n //= 2
        lanes = lanes[:, :n] + lanes[:, n : 2 * n]
        folds += 1
    return np.asarray(lanes.view(np.uint8).sum(axis=1, dtype=np.int64))


class FeatureBlock:
    """The per-feature references of one input (``feature`` set), over ``[rows, width]`` feature views."""

    def __init__(self, refs: list[FeatureReference]) -> None:
        self.refs = refs
        n = len(refs)
        self.max_col = max((r.feature or 0 for r in refs), default=-1)
        self.cols = np.asarray([r.feature for r in refs], dtype=np.intp)
        self.natural = bool((self.cols == np.arange(n)).all())  # features 0..n-1 in order: no column copy
        width = max((len(r.edges) for r in refs), default=1)
        self.edges = np.full((width, n), np.inf)  # [edge, feature], padded with +inf (never >=)
        for i, r in enumerate(refs):
            self.edges[: len(r.edges), i] = r.edges
        with np.errstate(over="ignore"):  # edges beyond the float32 range become +-inf, then step inwards
            up = self.edges.astype(np.float32)  # nearest float32; step up where that fell below the edge
        # float32 data compares exactly against edges rounded up to float32 (x >= e <=> x >= ceil32(e))
        self.edges32 = np.where(up < self.edges, np.nextafter(up, np.float32(np.inf)), up).astype(np.float32)
        self.padded = -(-n // 8) * 8
        self._tiles: dict[str, np.ndarray] = {}  # edges repeated _SUPER_ROWS times, per dtype
        self.ge = np.zeros((width, n), dtype=np.int64)  # finite values >= each edge
        self.finite = np.zeros(n, dtype=np.int64)
        self.nan = np.zeros(n, dtype=np.int64)
        self.min = np.full(n, np.inf)
        self.max = np.full(n, -np.inf)
        self.sum = np.zeros(n)
        self.sum_sq = np.zeros(n)

    def applies(self, width: int) -> bool:
        """Whether rows of this many features are summarised (every referenced feature exists)."""
        return bool(self.refs) and self.max_col < width

    def add(self, view: np.ndarray) -> None:
        """Add rows (``[rows, width]``, in recording order) whose width :meth:`applies`."""
        v = view if self.natural and view.shape[1] == len(self.cols) else view[:, self.cols]
        with _borrowed() as pool:
            for lo in range(0, len(v), CHUNK_ROWS):  # bounded scratch arrays, whatever the batch
                self._add_chunk(v[lo : lo + CHUNK_ROWS], pool)

    def _add_chunk(self, v: np.ndarray, pool: dict[str, np.ndarray]) -> None:
        rows, n = v.shape
        staged = _take(pool, "staged", (rows + 1, n), np.float64)  # the total first: one sequential pass adds rows
        staged[0] = self.sum
        staged[1:] = v
        sums = np.add.reduce(staged, axis=0)
        if not np.isfinite(sums).all():  # a non-finite value somewhere (or an overflowed total): slow path
            self._add_with_non_finite(v, staged[1:].copy(), pool)
            return
        self.sum = sums
        body = staged[1:]
        np.multiply(body, body, out=body)
        staged[0] = self.sum_sq
        self.sum_sq = np.add.reduce(staged, axis=0)
        self.min = np.minimum(self.min, _fold(np.minimum, v))
        self.max = np.maximum(self.max, _fold(np.maximum, v))
        self.finite += rows
        f32 = v.dtype == np.float32
        self._add_buckets(v if f32 else v.astype(np.float64, copy=False), self.edges32 if f32 else self.edges, pool)

    def _add_with_non_finite(self, v: np.ndarray, v64: np.ndarray, pool: dict[str, np.ndarray]) -> None:
        finite = np.isfinite(v64)
        self.nan += (~finite).sum(axis=0)
        self.finite += finite.sum(axis=0)
        zeroed = np.where(finite, v64, 0.0)  # adding 0.0 leaves a total unchanged: same as skipping
        staged = np.empty((len(v64) + 1, v64.shape[1]))
        staged[0], staged[1:] = self.sum, zeroed
        self.sum = np.add.reduce(staged, axis=0)
        staged[0], staged[1:] = self.sum_sq, zeroed * zeroed
        self.sum_sq = np.add.reduce(staged, axis=0)
        self.min = np.minimum(self.min, np.where(finite, v64, np.inf).min(axis=0))
        self.max = np.maximum(self.max, np.where(finite, v64, -np.inf).max(axis=0))
        self._add_buckets(np.where(finite, v64, np.nan), self.edges, pool)  # NaN >= e is False: never counted

    def _add_buckets(self, v: np.ndarray, edges: np.ndarray, pool: dict[str, np.ndarray]) -> None:
        """Count, per feature and edge, the values ``>= edge`` (NaN never is): one comparison pass per edge."""
        rows, n = v.shape
        padded_rows = 1 << max(0, (rows - 1).bit_length())
        ge = _take(pool, "ge", (len(edges), padded_rows, self.padded), np.bool_)
        ge[:, rows:] = False
        ge[:, :rows, n:] = False
        whole = rows // _SUPER_ROWS * _SUPER_ROWS if n == self.padded and v.flags.c_contiguous else 0
        if whole:  # _SUPER_ROWS rows side by side: one long contiguous comparison instead of one per row
            tiled = self._tiled(edges)
            wide = v[:whole].reshape(-1, _SUPER_ROWS * n)
            for e in range(len(edges)):
                np.greater_equal(wide, tiled[e], out=ge[e, :whole].reshape(-1, _SUPER_ROWS * n))
        for e, column in enumerate(edges):
            np.greater_equal(v[whole:], column, out=ge[e, whole:rows, :n])
        self.ge += _column_counts(ge, rows)[:, :n]

    def _tiled(self, edges: np.ndarray) -> np.ndarray:
        key = edges.dtype.char
        tiled = self._tiles.get(key)
        if tiled is None:
            tiled = self._tiles[key] = np.tile(edges, (1, _SUPER_ROWS))
        return tiled

    def summaries(self) -> list[FeatureSummary]:
        out = []
        for i, r in enumerate(self.refs):
            k = len(r.edges)
            ge = [int(c) for c in self.ge[:k, i]]
            counts = [int(self.finite[i]) - ge[0], *(ge[j - 1] - ge[j] for j in range(1, k)), ge[-1]]
            lo = float(self.min[i])
            out.append(
                FeatureSummary(
                    input=r.input,
                    feature=r.feature,
                    edges=list(r.edges),
                    counts=counts,
                    nan_count=int(self.nan[i]),
                    min=lo if lo != np.inf else None,
                    max=float(self.max[i]) if lo != np.inf else None,
                    sum=float(self.sum[i]),
                    sum_sq=float(self.sum_sq[i]),
                )
            )
        return out


class WholeInput:
    """References covering every element of an input (``feature`` None): values in row-major order."""

    def __init__(self, refs: list[FeatureReference]) -> None:
        self.refs = refs
        self.counts = [np.zeros(len(r.edges) + 1, dtype=np.int64) for r in refs]
        self.nan = 0
        self.min = np.inf
        self.max = -np.inf
        self.sum = 0.0
        self.sum_sq = 0.0

    def add(self, arrays: list[np.ndarray]) -> None:
        """Add requests' arrays in recording order (0-d arrays, i.e. missing inputs, are skipped)."""
        if not self.refs:
            return
        parts = [a.ravel() for a in arrays if a.ndim]
        if not parts:
            return
        flat = np.concatenate(parts).astype(np.float64, copy=False)
        finite = np.isfinite(flat)
        vals = flat[finite]
        self.nan += int(flat.size - vals.size)
        if not vals.size:
            return
        # cumsum adds one value at a time: the same rounding as a value-by-value running total
        self.sum = float(np.cumsum(np.concatenate(([self.sum], vals)))[-1])
        self.sum_sq = float(np.cumsum(np.concatenate(([self.sum_sq], vals * vals)))[-1])
        self.min = min(self.min, float(vals.min()))
        self.max = max(self.max, float(vals.max()))
        for i, r in enumerate(self.refs):
            self.counts[i] += _counts(np.asarray(r.edges), vals)

    def summaries(self) -> list[FeatureSummary]:
        return [
            FeatureSummary(
                input=r.input,
                feature=None,
                edges=list(r.edges),
                counts=[int(c) for c in self.counts[i]],
                nan_count=self.nan,
                min=self.min if self.min != np.inf else None,
                max=self.max if self.min != np.inf else None,
                sum=self.sum,
                sum_sq=self.sum_sq,
            )
            for i, r in enumerate(self.refs)
        ]


@dataclass
class OutputStats:
    """NaN count of one output, plus class counts and confidences when it is a class output."""

    name: str
    classes: int | None
    copied: bool = True  # False for string outputs: nothing to summarise
    class_counts: np.ndarray | None = None
    confidence_counts: np.ndarray | None = None
    nan_count: int = 0

    def add(self, value: np.ndarray) -> None:
        """Add one request's output, or rows of several whose last axis is the class axis."""
        floating = np.issubdtype(value.dtype, np.floating)
        all_finite = not floating or bool(np.isfinite(value.sum(dtype=np.float64)))  # finite sum: all finite
        if not all_finite:
            self.nan_count += int((~np.isfinite(value)).sum())
        if self.classes is None or value.ndim == 0 or value.shape[-1] != self.classes:
            return
        rows = value.reshape(-1, self.classes)
        if not all_finite:
            rows = rows[np.isfinite(rows).all(axis=1)]
        if rows.size == 0:
            return
        # argmax in the output's own dtype: converting to float64 is exact and keeps the order
        self.add_counts(
            np.bincount(rows.argmax(axis=1), minlength=self.classes),
            _counts(np.asarray(CONFIDENCE_EDGES), row_confidences(rows)),
        )

    def add_counts(self, class_counts: Any, confidence_counts: Any) -> None:
        """Add class counts and confidence-bucket counts summarised elsewhere (the C request path)."""
        if self.class_counts is None or self.confidence_counts is None:
            assert self.classes is not None
            self.class_counts = np.zeros(self.classes, dtype=np.int64)
            self.confidence_counts = np.zeros(len(CONFIDENCE_EDGES) + 1, dtype=np.int64)
        self.class_counts += np.asarray(class_counts, dtype=np.int64)
        self.confidence_counts += np.asarray(confidence_counts, dtype=np.int64)

    def add_batch(self, arrays: list[np.ndarray]) -> None:
        """Add several requests' outputs (rows of class outputs are summarised together)."""
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
