"""Synthetic inference inputs for simulated devices, optionally drifted.

:class:`InputSampler` draws batches shaped like a model's inputs. Its pool, best first:

1. the bundle's own test vectors (``test_vectors.npz``: ``in.<input name>`` arrays), resampled row by
   row, so inputs look like what the model was built for;
2. the bundle's reference histograms (``reference_stats.json``), sampled bucket by bucket;
3. uniform noise in [0, 1) when neither is available.

A :class:`Drift` moves every feature by ``shift`` standard deviations of the pool (and scales its
spread by ``scale``): what a sensor knocked out of calibration does to a model's inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgeota_contract.manifest import TensorSpec
from edgeota_contract.telemetry import ReferenceStats

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Drift:
    shift: float = 0.0  # in pool standard deviations
    scale: float = 1.0

    @property
    def active(self) -> bool:
        return self.shift != 0.0 or self.scale != 1.0


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

    @classmethod
    def from_bundle_dir(cls, bundle_dir: Path, inputs: Sequence[TensorSpec], seed: int = 0) -> InputSampler:
        """Use the test vectors and reference statistics unpacked in ``bundle_dir`` (either may be missing)."""
        pools: dict[str, Array] = {}
        vectors = bundle_dir / "test_vectors.npz"
        if vectors.is_file():
            with np.load(vectors) as data:
                for spec in inputs:
                    key = f"in.{spec.name}"
                    if key in data.files and data[key].ndim >= 1 and len(data[key]) > 0:
                        pools[spec.name] = np.asarray(data[key])
        reference = None
        stats = bundle_dir / "reference_stats.json"
        if stats.is_file():
            reference = ReferenceStats.model_validate_json(stats.read_bytes())
        return cls(inputs, pools, reference, seed)

    def sample(self, batch: int = 1, drift: Drift | None = None) -> dict[str, Array]:
        """One batch per input, named as the model expects; drifted when ``drift`` is active."""
        out: dict[str, Array] = {}
        for spec in self.inputs:
            x = self._draw(spec, batch)
            if drift is not None and drift.active and np.issubdtype(x.dtype, np.floating):
                x = self._drift(spec, x, drift)
            out[spec.name] = x
        return out

    def _draw(self, spec: TensorSpec, batch: int) -> Array:
        pool = self._pools.get(spec.name)
        if pool is not None:
            rows = self._rng.integers(0, len(pool), size=batch)
            return np.ascontiguousarray(pool[rows])
        shape = _concrete_shape(spec, batch)
        dtype = np.dtype(spec.dtype if spec.dtype != "float" else "float32")
        refs = [f for f in (self._reference.features if self._reference else []) if f.input == spec.name]
        if refs and np.issubdtype(dtype, np.floating):
            return self._from_histograms(refs, shape).astype(dtype)
        if np.issubdtype(dtype, np.integer):
            return self._rng.integers(0, 10, size=shape).astype(dtype)
        return self._rng.random(size=shape).astype(dtype)

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
        return moved
