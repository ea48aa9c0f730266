"""Calibration and evaluation data: ``.npz`` files keyed by model input name, plus ``labels``.

Data is checked against the model before any work starts (names, dtypes, non-batch shapes,
label count, finite values) so a mismatch is one clear error. Calibration is streamed to ONNX Runtime's
calibrators in small batches and capped at a sample count (:class:`CappedReader`).

Sample axes. Arrays are stored in the model's own layout. The samples of an input are on
axis 0 unless the model puts its batch elsewhere: recurrent state such as ``[2, batch, 128]``
(silero-vad) holds its samples on axis 1. The rule (:func:`sample_axis`): the sample count ``N``
is the length of axis 0 of the first non-scalar input; an input's sample axis is axis 0 when
that fits (length ``N``, every other fixed model dimension matched), else the axis carrying
the same symbolic dimension as the first input's batch, else the first axis that fits. A
rank-0 model input (e.g. silero's sample rate ``sr``) is *shared*: one value, fed unchanged
with every batch. Internally :attr:`Dataset.inputs` holds samples-first views; :meth:`Dataset.feed`
gives back model-layout arrays.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeota_contract.bundle import sha256_file
from packager.errors import DataError
from packager.onnx_utils import IOSpec

LABELS_KEY = "labels"
ZIP_MAGIC = b"PK"  # an .npz is a zip archive (local file header, or the end record of an empty one)
NPY_MAGIC = b"\x93NUMPY"  # a single .npy array: refused below with its own message


@dataclass
class Dataset:
    """Per-sample arrays for each model input (samples first), shared inputs, optional labels, the digest.

    ``axes`` maps an input to the axis its samples occupy in the model's layout (absent: 0);
    ``shared`` holds rank-0 inputs fed unchanged with every batch. Use :meth:`feed` to get
    arrays to hand to ONNX Runtime.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    sha256: str
    path: Path | None = None
    role: str = "calibration"
    extra_keys: list[str] = field(default_factory=list)
    axes: dict[str, int] = field(default_factory=dict)
    shared: dict[str, np.ndarray] = field(default_factory=dict)

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
            axes=dict(self.axes),
            shared=dict(self.shared),
        )

    def model_layout(self, name: str, rows: np.ndarray) -> np.ndarray:
        """``rows`` (samples first) of input ``name`` moved to the model's sample axis."""
        axis = self.axes.get(name, 0)
        return np.ascontiguousarray(np.moveaxis(rows, 0, axis)) if axis else rows

    def feed(self, start: int, stop: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Samples ``start:stop`` in the model's layout; with ``pad_to``, the last row repeats up to that many."""
        feed: dict[str, np.ndarray] = {}
        for k, v in self.inputs.items():
            rows = v[start:stop]
            if pad_to is not None and 0 < len(rows) < pad_to:
                rows = np.concatenate([rows, np.repeat(rows[-1:], pad_to - len(rows), axis=0)])
            feed[k] = self.model_layout(k, rows)
        feed.update(self.shared)
        return feed

    def batches(self, batch: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.count if limit is None else min(limit, self.count)
        for start in range(0, n, batch):
            yield self.feed(start, min(start + batch, n))


def load_dataset(path: Path, specs: list[IOSpec], role: str = "calibration") -> Dataset:
    """Load ``path`` and check it against the model inputs ``specs``; one-line :class:`DataError` on defects."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(NPY_MAGIC))
        if not head.startswith(ZIP_MAGIC) and head != NPY_MAGIC:
            # numpy would try to unpickle it and answer with a hint about allow_pickle.
            raise DataError(
                f"{role} data {path} is not a readable .npz file: not a zip archive of arrays "
                "(write one with numpy.savez(path, <input name>=array, ...))"
            )
        digest = sha256_file(path)
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{role} data {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"{role} data {path} is a folder, not an .npz file") from None
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
    axes: dict[str, int] = {}
    shared: dict[str, np.ndarray] = {}
    count: int | None = None
    first = ""
    batch_symbol: str | None = None
    for spec in specs:
        arr = np.asarray(arrays[spec.name])
        want = spec.numpy_dtype
        if not spec.shape:
            if arr.size != 1:
                raise DataError(
                    f"{label}: input {spec.name!r} is a scalar in the model (shared by every sample); "
                    f"got shape {tuple(arr.shape)}"
                )
            arr = arr.reshape(())
        elif arr.ndim != len(spec.shape):
            raise DataError(
                f"{label}: input {spec.name!r} has shape {tuple(arr.shape)} but the model expects rank "
                f"{len(spec.shape)} {_fmt(spec.shape)}"
            )
        if arr.dtype != want:
            if (want.kind == "f" and arr.dtype.kind in "fiu") or (want.kind in "iu" and arr.dtype.kind in "iu"):
                arr = arr.astype(want)
            else:
                raise DataError(f"{label}: input {spec.name!r} is {arr.dtype}, the model expects {want}")
        _check_finite(arr, spec.name, label)
        if not spec.shape:
            shared[spec.name] = arr
            continue
        if count is None:
            count, first = arr.shape[0], spec.name
            batch_symbol = spec.shape[0] if isinstance(spec.shape[0], str) else None
        axis = sample_axis(spec.shape, arr.shape, count, batch_symbol)
        if axis is None:
            if any(_batch_like(spec.shape[a]) and _fits(spec.shape, arr.shape, a) for a in range(arr.ndim)):
                raise DataError(
                    f"{label}: inputs have different sample counts: no axis of {spec.name!r} {tuple(arr.shape)} "
                    f"holds the {count} samples of {first!r} (model shape {_fmt(spec.shape)})"
                )
            raise DataError(
                f"{label}: input {spec.name!r} has shape {tuple(arr.shape)} but the model expects {_fmt(spec.shape)}"
            )
        if arr.shape[axis] == 0:
            raise DataError(f"{label}: input {spec.name!r} has no samples")
        if axis:
            axes[spec.name] = axis
        inputs[spec.name] = np.ascontiguousarray(np.moveaxis(arr, axis, 0))
    if count is None:
        raise DataError(f"{label}: every model input is a scalar; at least one input must carry samples")
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(f"{label}: 'labels' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) != count:
            raise DataError(f"{label}: {len(labels)} labels for {count} samples")
        labels = labels.astype(np.int64)
    extra = sorted(set(arrays) - {s.name for s in specs} - {LABELS_KEY})
    return Dataset(inputs, labels, sha256, path, role, extra, axes=axes, shared=shared)


def _check_finite(arr: np.ndarray, name: str, label: str) -> None:
    """Refuse NaN or infinity in a float input: calibration ranges and every gate would be meaningless."""
    if arr.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        count, first = int(bad.sum()), tuple(int(i) for i in np.unravel_index(int(bad.argmax()), bad.shape))
        what = "every value" if count == arr.size else f"{count} of {arr.size} values"
        raise DataError(
            f"{label}: input {name!r} has NaN or infinite values ({what}, the first at index {first}); "
            "the data must be finite"
        )


def _batch_like(dim: Any) -> bool:
    """A model dimension that can hold samples: symbolic/unknown, or a fixed batch of 1."""
    return not isinstance(dim, int) or dim == 1


def _fits(model_shape: tuple[Any, ...], shape: tuple[int, ...], axis: int) -> bool:
    """Every fixed model dimension but ``axis`` matches ``shape``."""
    return all(
        b == axis or not isinstance(d, int) or d == have
        for b, (have, d) in enumerate(zip(shape, model_shape, strict=True))
    )


def sample_axis(
    model_shape: tuple[Any, ...], shape: tuple[int, ...], count: int, batch_symbol: str | None
) -> int | None:
    """The axis holding the ``count`` samples of an array of ``shape`` for a model input of ``model_shape``.

    Axis 0 when it fits; else the axis named like the first input's batch (``batch_symbol``);
    else the first axis that fits; None when no axis does (see the module doc).
    """
    fits = [a for a in range(len(shape)) if shape[a] == count and _fits(model_shape, shape, a)]
    if not fits:
        return None
    if 0 in fits:
        return 0
    named = [a for a in fits if batch_symbol is not None and model_shape[a] == batch_symbol]
    return named[0] if named else fits[0]


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
