"""Synthetic inference inputs for simulated devices, optionally drifted.

:class:`InputSampler` draws batches shaped like a model's inputs. Its pool, best first:

0. with ``source="digits"``, scikit-learn's digits data set (1,797 images, scaled as the digits
   example model was trained: pixel / 16), reshaped to the input's shape when it holds 64 values per
   row: the varied, natural inputs a deployed digits model sees, so a release that is wrong or NaN on
   a share of real inputs shows in the fleet's telemetry (the bundle's few test vectors may all miss
   that share);
1. the bundle's own test vectors (``test_vectors.npz``: ``in.<input name>`` arrays), resampled row by
   row, so inputs look like what the model was built for;
2. the bundle's reference histograms (``reference_stats.json``), sampled bucket by bucket;
3. uniform noise in [0, 1) when neither is available.

Pools are read once per bundle and data set per process and shared (read-only) by every sampler.

A :class:`Drift` moves every feature (or only the flat feature indices it names) by ``shift`` standard
deviations of the pool (and scales its spread by ``scale``): what a sensor knocked out of calibration does
to a model's inputs. With the digits source, :meth:`InputSampler.sample_labelled` also returns each row's
true digit, so a simulated application can report feedback labels.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgeota_contract.manifest import TensorSpec
from edgeota_contract.telemetry import ReferenceStats

Array = npt.NDArray[Any]
InputSource = Literal["test_vectors", "digits"]
INPUT_SOURCES: tuple[str, ...] = ("test_vectors", "digits")
_CACHE_LOCK = threading.Lock()
_BUNDLE_CACHE: dict[tuple[str, tuple[str, ...]], tuple[dict[str, Array], ReferenceStats | None]] = {}
_DIGITS: list[tuple[Array, Array]] = []


def _digits() -> tuple[Array, Array]:
    with _CACHE_LOCK:
        if not _DIGITS:
            from sklearn.datasets import load_digits

            loaded = load_digits()
            data = (loaded.data / 16.0).astype(np.float32)
            labels = np.asarray(loaded.target, dtype=np.int64)
            data.setflags(write=False)
            labels.setflags(write=False)
            _DIGITS.append((data, labels))
        return _DIGITS[0]


def digits_pool() -> Array:
    """scikit-learn's digits images as float32 rows of 64 pixels in [0, 1] (pixel / 16, as the example model
    was trained); loaded once per process, read-only."""
    return _digits()[0]


def digits_labels() -> Array:
    """The true digit of each row of :func:`digits_pool` (int64, read-only)."""
    return _digits()[1]


def natural_pools(inputs: Sequence[TensorSpec], source: InputSource) -> dict[str, Array]:
    """Per input name, the ``source`` pool reshaped to the input's row shape; inputs it does not fit (not 64
    floating values per row) are left out, so they fall back to the bundle's own pool."""
    if source != "digits":
        return {}
    out: dict[str, Array] = {}
    for spec in inputs:
        row = _concrete_shape(spec, 1)[1:]
        if not np.issubdtype(np.dtype(spec.dtype if spec.dtype != "float" else "float32"), np.floating):
            continue
        if int(np.prod(row)) == 64:
            out[spec.name] = digits_pool().reshape(-1, *row)
    return out


@dataclass(frozen=True)
class Drift:
    shift: float = 0.0  # in pool standard deviations
    scale: float = 1.0
    features: tuple[int, ...] = ()
    """Flat feature indices within a row to move (``()``: every feature)."""

    @property
    def active(self) -> bool:
        return self.shift != 0.0 or self.scale != 1.0


def _bundle_pools(
    bundle_dir: Path, inputs: Sequence[TensorSpec], cache_key: str | None
) -> tuple[dict[str, Array], ReferenceStats | None]:
    key = (cache_key, tuple(spec.name for spec in inputs)) if cache_key else None
    if key is not None:
        with _CACHE_LOCK:
            cached = _BUNDLE_CACHE.get(key)
        if cached is not None:
            return cached
    pools: dict[str, Array] = {}
    vectors = bundle_dir / "test_vectors.npz"
    if vectors.is_file():
        with np.load(vectors) as data:
            for spec in inputs:
                name = f"in.{spec.name}"
                if name in data.files and data[name].ndim >= 1 and len(data[name]) > 0:
                    pools[spec.name] = np.asarray(data[name])
                    pools[spec.name].setflags(write=False)
    reference = None
    stats = bundle_dir / "reference_stats.json"
    if stats.is_file():
        reference = ReferenceStats.model_validate_json(stats.read_bytes())
    if key is not None:
        with _CACHE_LOCK:
            _BUNDLE_CACHE[key] = (pools, reference)
    return pools, reference


def _concrete_shape(spec: TensorSpec, batch: int) -> list[int]:
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    if dims:
        dims[0] = batch  # the first axis is the batch axis by convention
    return dims


class InputSampler:
    """Draws input batches for one model; thread-safe only per instance's own RNG (one per device)."""

    def __init__(
        self,
        inputs: Sequence[TensorSpec],
        pools: Mapping[str, Array] | None = None,
        reference: ReferenceStats | None = None,
        seed: int = 0,
    ) -> None:
        self.inputs = list(inputs)
        self._pools = dict(pools or {})
        self._reference = reference
        self._rng = np.random.default_rng(seed)
        self._natural: dict[str, Array] = {}  # the pools drawn from the digits data set (rows have labels)

    @classmethod
    def from_bundle_dir(
        cls,
        bundle_dir: Path,
        inputs: Sequence[TensorSpec],
        seed: int = 0,
        source: InputSource = "test_vectors",
        cache_key: str | None = None,
    ) -> InputSampler:
        """Use the test vectors and reference statistics unpacked in ``bundle_dir`` (either may be missing),
        or, with ``source="digits"``, the digits data set for the inputs it fits.

        ``cache_key`` (e.g. the bundle's digest): read the folder once per process for that key and share the
        arrays with every later sampler of the same key (thousands of simulated devices run the same bundle).
        """
        pools, reference = _bundle_pools(bundle_dir, inputs, cache_key)
        natural = natural_pools(inputs, source)
        sampler = cls(inputs, {**pools, **natural}, reference, seed)
        sampler._natural = natural
        return sampler

    def sample(self, batch: int = 1, drift: Drift | None = None) -> dict[str, Array]:
        """One batch per input, named as the model expects; drifted when ``drift`` is active."""
        return self.sample_labelled(batch, drift)[0]

    def sample_labelled(self, batch: int = 1, drift: Drift | None = None) -> tuple[dict[str, Array], Array | None]:
        """Like :meth:`sample`, plus the true digit of each row when the first input is drawn from the digits
        data set (None otherwise)."""
        out: dict[str, Array] = {}
        labels: Array | None = None
        for index, spec in enumerate(self.inputs):
            x, rows = self._draw(spec, batch)
            if index == 0 and rows is not None and self._pools.get(spec.name) is self._natural.get(spec.name):
                labels = np.asarray(digits_labels()[rows])
            if drift is not None and drift.active and np.issubdtype(x.dtype, np.floating):
                x = self._drift(spec, x, drift)
            out[spec.name] = x
        return out, labels

    def _draw(self, spec: TensorSpec, batch: int) -> tuple[Array, Array | None]:
        pool = self._pools.get(spec.name)
        if pool is not None:
            rows = self._rng.integers(0, len(pool), size=batch)
            return np.ascontiguousarray(pool[rows]), rows
        shape = _concrete_shape(spec, batch)
        dtype = np.dtype(spec.dtype if spec.dtype != "float" else "float32")
        refs = [f for f in (self._reference.features if self._reference else []) if f.input == spec.name]
        if refs and np.issubdtype(dtype, np.floating):
            return self._from_histograms(refs, shape).astype(dtype), None
        if np.issubdtype(dtype, np.integer):
            return self._rng.integers(0, 10, size=shape).astype(dtype), None
        return self._rng.random(size=shape).astype(dtype), None

    def _from_histograms(self, refs: Sequence[Any], shape: list[int]) -> Array:
        x = np.empty(shape, dtype=np.float64)
        per_feature = [r for r in refs if r.feature is not None]
        if per_feature and len(shape) >= 1:
            for ref in per_feature:
                if ref.feature < shape[-1]:
                    x[..., ref.feature] = self._hist_values(ref.edges, ref.counts, x[..., ref.feature].shape)
            return x
        values: Array = self._hist_values(refs[0].edges, refs[0].counts, tuple(shape))
        return values

    def _hist_values(self, edges: Sequence[float], counts: Sequence[int], shape: tuple[int, ...]) -> Array:
        e = np.asarray(edges, dtype=np.float64)
        c = np.asarray(counts, dtype=np.float64)
        if c.sum() <= 0:
            return self._rng.random(size=shape)
        width = float(e[-1] - e[0]) / max(len(e) - 1, 1) or 1.0
        lows = np.concatenate([[e[0] - width], e])  # open-ended outer buckets get one bucket width
        highs = np.concatenate([e, [e[-1] + width]])
        buckets = self._rng.choice(len(c), size=shape, p=c / c.sum())
        values: Array = lows[buckets] + self._rng.random(size=shape) * (highs[buckets] - lows[buckets])
        return values

    def _drift(self, spec: TensorSpec, x: Array, drift: Drift) -> Array:
        pool = self._pools.get(spec.name)
        ref = pool if pool is not None else x
        mean = ref.mean(axis=0)
        std = ref.std(axis=0)
        std = np.where(std > 0, std, float(np.std(ref)) or 1.0)
        moved: Array = ((x - mean) * drift.scale + mean + drift.shift * std).astype(x.dtype)
        if not drift.features:
            return moved
        flat_x = x.reshape(len(x), -1).copy()
        chosen = [f for f in drift.features if 0 <= f < flat_x.shape[1]]
        flat_x[:, chosen] = moved.reshape(len(x), -1)[:, chosen]
        return flat_x.reshape(x.shape)
