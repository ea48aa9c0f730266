"""Calibration and evaluation data: ``.npz`` files keyed by model input name, plus ``labels``.

Data is checked against the model before any work starts (names, dtypes, non-batch shapes,
label count) so a mismatch is one clear error. Calibration is streamed to ONNX Runtime's
calibrators in small batches and capped at a sample count (:class:`CappedReader`).
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packager.errors import DataError
from packager.onnx_utils import IOSpec

LABELS_KEY = "labels"


@dataclass
class Dataset:
    """Arrays for each model input (first axis = samples), optional labels, and the file digest."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str
    path: Path | None = None
    role: str = "calibration"
    extra_keys: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(next(iter(self.inputs.values())))

    def head(self, n: int) -> Dataset:
        return Dataset(
            {k: v[:n] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:n],
            self.sha256,
            self.path,
            self.role,
        )

    def batches(self, batch: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.count if limit is None else min(limit, self.count)
        for start in range(0, n, batch):
            yield {k: v[start : min(start + batch, n)] for k, v in self.inputs.items()}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_dataset(path: Path, specs: list[IOSpec], role: str = "calibration") -> Dataset:
    """Load ``path`` and check it against the model inputs ``specs``; one-line :class:`DataError` on defects."""
    path = Path(path)
    try:
        digest = _sha256_file(path)
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{role} data {path} does not exist") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"{role} data {path} is not a readable .npz file: {exc}") from exc
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(f"{role} data {path} is a single array; expected an .npz keyed by input name")
    with npz:
        keys = list(npz.files)
        try:
            arrays = {k: npz[k] for k in keys}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{role} data {path} has an unreadable array: {exc}") from exc
    return check_dataset(arrays, specs, role=role, sha256=digest, path=path)


def check_dataset(
    arrays: dict[str, np.ndarray],
    specs: list[IOSpec],
    *,
    role: str = "calibration",
    sha256: str = "",
    path: Path | None = None,
) -> Dataset:
    label = f"{role} data" + (f" {path.name}" if path else "")
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "nothing"
        raise DataError(f"{label} lacks model input {missing[0]!r} (it has: {have})")
    inputs: dict[str, np.ndarray] = {}
    count: int | None = None
    for spec in specs:
        arr = arrays[spec.name]
        want = spec.numpy_dtype
        if arr.ndim != len(spec.shape):
            raise DataError(
                f"{label}: input {spec.name!r} has shape {tuple(arr.shape)} but the model expects rank "
                f"{len(spec.shape)} {_fmt(spec.shape)}"
            )
        for axis, (have, dim) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if axis > 0 and isinstance(dim, int) and have != dim:
                raise DataError(
                    f"{label}: input {spec.name!r} has shape {tuple(arr.shape)} but the model expects {_fmt(spec.shape)}"
                )
        if arr.dtype != want:
            if (want.kind == "f" and arr.dtype.kind in "fiu") or (want.kind in "iu" and arr.dtype.kind in "iu"):
                arr = arr.astype(want)
            else:
                raise DataError(f"{label}: input {spec.name!r} is {arr.dtype}, the model expects {want}")
        if arr.shape[0] == 0:
            raise DataError(f"{label}: input {spec.name!r} has no samples")
        if count is not None and arr.shape[0] != count:
            raise DataError(f"{label}: inputs have different sample counts ({count} and {arr.shape[0]})")
        count = arr.shape[0]
        inputs[spec.name] = np.ascontiguousarray(arr)
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{label}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) != count:
            raise DataError(f"{label}: {len(labels)} labels for {count} samples")
        labels = labels.astype(np.int64)
    extra = sorted(set(arrays) - {s.name for s in specs} - {LABELS_KEY})
    return Dataset(inputs, labels, sha256, path, role, extra)


def _fmt(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join("N" if not isinstance(d, int) else str(d) for d in shape) + "]"


class CappedReader:
    """An ONNX Runtime ``CalibrationDataReader`` streaming at most ``cap`` samples in ``batch``-sized feeds.

    Only one batch is materialised at a time; ``rewind()`` restarts the stream (entropy and
    percentile calibrators read it once, the activation-error analysis reads it again).
    """

    def __init__(self, data: Dataset, cap: int, batch: int) -> None:
        self.data = data
        self.cap = min(cap, data.count)
        self.batch = max(1, batch)
        self._iter: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._iter is None:
            self._iter = self.data.batches(self.batch, self.cap)
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter = None

    def __len__(self) -> int:
        return (self.cap + self.batch - 1) // self.batch


def make_reader(data: Dataset, cap: int, batch: int) -> Any:
    """A :class:`CappedReader` that also subclasses ORT's ``CalibrationDataReader`` (imported lazily)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CappedReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    return _Reader(data, cap, batch)
