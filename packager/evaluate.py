"""Measuring a candidate model on the packaging host: quality, latency and session memory.

Quality runs use one intra-op thread so that the figures (and so bundles) are reproducible.
Latency is measured at batch 1 (or the model's fixed batch) with the profile's thread count,
interleaving the fp32 reference and the candidate in rounds so that machine noise hits both.
Session memory is the growth of this process's resident set from before creating the session
to after the warm-up runs (an in-process estimate: it includes ORT's arena and weights).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from packager.data import Dataset
from packager.errors import PackagerError

HOST_EP = "CPUExecutionProvider"


@dataclass(frozen=True)
class LatencySettings:
    warmup: int = 20
    rounds: int = 5
    runs_per_round: int = 40


def make_session(model_bytes: bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=[HOST_EP])


def session_batch(session: Any, data: Dataset | None = None) -> int | None:
    """The fixed batch of the model (the first per-sample input's sample axis), or None when dynamic."""
    for inp in session.get_inputs():
        if not inp.shape:
            continue  # a shared scalar input
        axis = data.axes.get(inp.name, 0) if data is not None else 0
        dim = inp.shape[axis] if axis < len(inp.shape) else None
        return dim if isinstance(dim, int) else None
    return None


def output_sample_axis(out: np.ndarray, batch: int) -> int:
    """Where a batch of ``batch`` samples sits in one output: axis 0 when it has that length, else the first that does.

    silero-vad's state output ``[2, batch, 128]`` has its samples on axis 1. Decided on the first
    (full) batch of a run and kept for the rest, so a short last batch cannot confuse it.
    """
    if out.ndim == 0:
        return -1
    if out.shape[0] == batch:
        return 0
    for axis, size in enumerate(out.shape):
        if size == batch:
            return axis
    return 0


def run_dataset(session: Any, data: Dataset, batch: int = 64) -> list[np.ndarray]:
    """All outputs of ``session`` over ``data``, samples first, batched (padding the last batch for fixed-batch models).

    Raises :class:`PackagerError` when the model fails to run on the data.
    """
    fixed = session_batch(session, data)
    step = fixed or batch
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    out_axes: list[int] | None = None
    n = data.count
    for start in range(0, n, step):
        real = min(step, n - start)
        feed = data.feed(start, start + step, pad_to=fixed)
        try:
            outs = session.run(names, feed)
        except Exception as exc:
            raise PackagerError(
                f"model failed to run on the {data.role} data: {str(exc).splitlines()[0][:300]}"
            ) from exc
        if out_axes is None:
            out_axes = [output_sample_axis(np.asarray(o), fixed or real) for o in outs]
        for i, out in enumerate(outs):
            arr = np.asarray(out)
            if out_axes[i] < 0:  # a scalar output: one value per batch, repeated for its rows
                arr = np.repeat(arr.reshape(1), real)
            elif out_axes[i] > 0:
                arr = np.moveaxis(arr, out_axes[i], 0)
            chunks[i].append(arr[:real])
    return [np.concatenate(c) for c in chunks]


def _row_major(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([o.reshape(len(o), -1).astype(np.float64) for o in outputs], axis=1)


def quality_metrics(
    outputs: list[np.ndarray],
    reference: list[np.ndarray],
    labels: np.ndarray | None,
    kinds: list[str] | None = None,
    score_threshold: float = 0.5,
) -> dict[str, float]:
    """Accuracy (when labels), and fidelity of ``outputs`` against the fp32 ``reference``.

    ``kinds`` (one :data:`packager.fidelity.OutputKind` per output) adds the task measures of
    :func:`packager.fidelity.task_metrics`; then ``cosine_mean``/``sqnr_db`` cover only the outputs
    judged as tensors (generic, class scores) when there are any, else every output.
    """
    metrics: dict[str, float] = {}
    task: dict[str, float] = {}
    from packager.fidelity import TENSOR_KINDS, task_metrics

    tensor_idx = list(range(len(outputs)))
    if kinds is not None:
        names = [str(i) for i in range(len(outputs))]
        task = task_metrics(outputs, reference, names, dict(zip(names, kinds, strict=True)), score_threshold)  # type: ignore[arg-type]
        tensor_idx = [i for i, k in enumerate(kinds) if k in TENSOR_KINDS] or tensor_idx
    cand = _row_major([outputs[i] for i in tensor_idx])
    ref = _row_major([reference[i] for i in tensor_idx])
    nan_rows = int((~np.isfinite(_row_major(outputs))).any(axis=1).sum())
    metrics["nonfinite_rows"] = float(nan_rows)
    first, first_ref = outputs[0], reference[0]
    if kinds is not None and kinds[0] not in TENSOR_KINDS:
        pass  # the first output has its own task measure (in ``task``)
    elif first.ndim == 2 and first.shape[1] > 1:
        pred = np.nan_to_num(first, nan=-np.inf).argmax(axis=1)
        metrics["top1_agreement"] = float((pred == first_ref.argmax(axis=1)).mean())
        if labels is not None:
            metrics["accuracy"] = float((pred == labels).mean())
    elif _is_probability(first_ref):
        # One probability per sample (a binary classifier such as a VAD): top-1 is the 0.5 decision.
        metrics["top1_agreement"] = float(((first.reshape(len(first)) >= 0.5) == (first_ref.reshape(-1) >= 0.5)).mean())
    metrics.update(task)
    if nan_rows:
        metrics["cosine_mean"] = float("nan")
        metrics["sqnr_db"] = float("nan")
        return metrics
    dot = (cand * ref).sum(axis=1)
    norms = np.linalg.norm(cand, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0)
    metrics["cosine_mean"] = float(cos.mean())
    noise = float(((cand - ref) ** 2).sum())
    signal = float((ref**2).sum())
    metrics["sqnr_db"] = 200.0 if noise == 0 else float(10 * math.log10(max(signal, 1e-30) / noise))
    return metrics


def _is_probability(ref: np.ndarray) -> bool:
    return (
        ref.dtype.kind == "f"
        and ref.ndim >= 1
        and ref.size == len(ref)
        and bool(np.isfinite(ref).all())
        and bool(((ref >= 0) & (ref <= 1)).all())
    )


def reference_accuracy(reference: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    first = reference[0]
    if labels is None or first.ndim != 2 or first.shape[1] < 2:
        return None
    return float((first.argmax(axis=1) == labels).mean())


def single_feed(session: Any, data: Dataset) -> dict[str, np.ndarray]:
    """One batch (1, or the model's fixed batch) of ``data`` in the model's layout."""
    batch = session_batch(session, data) or 1
    return data.feed(0, batch, pad_to=batch)


def measure_latency(
    candidate: bytes, reference: bytes | None, data: Dataset, threads: int, settings: LatencySettings
) -> dict[str, float]:
    """Host latency (ms) p50/p95 of ``candidate`` and, interleaved, of ``reference`` (fp32)."""
    sessions = {"candidate": make_session(candidate, threads)}
    if reference is not None and reference is not candidate:
        sessions["reference"] = make_session(reference, threads)
    feeds = {k: single_feed(s, data) for k, s in sessions.items()}
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        for _ in range(settings.warmup):
            s.run(None, feeds[k])
    for _ in range(settings.rounds):
        for k, s in sessions.items():
            feed = feeds[k]
            for _ in range(settings.runs_per_round):
                t0 = time.perf_counter_ns()
                s.run(None, feed)
                samples[k].append((time.perf_counter_ns() - t0) / 1e6)
    out: dict[str, float] = {}
    for k, values in samples.items():
        arr = np.asarray(values)
        prefix = "host_latency" if k == "candidate" else "host_fp32_latency"
        out[f"{prefix}_p50_ms"] = float(np.percentile(arr, 50))
        out[f"{prefix}_p95_ms"] = float(np.percentile(arr, 95))
    if "host_fp32_latency_p50_ms" in out:
        out["host_speedup_vs_fp32"] = out["host_fp32_latency_p50_ms"] / max(out["host_latency_p50_ms"], 1e-9)
    return out


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _trim() -> None:
    # Give freed heap back to the OS so the RSS delta shows this session, not old garbage.
    # (No gc.collect(): a full collection costs ~80 ms per call with scikit-learn loaded.)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_session_memory(model_bytes: bytes, data: Dataset, threads: int) -> int:
    """RSS growth (bytes) of creating a session and running it a few times (in-process estimate)."""
    _trim()
    before = _rss_bytes()
    session = make_session(model_bytes, threads)
    feed = single_feed(session, data)
    for _ in range(3):
        session.run(None, feed)
    after = _rss_bytes()
    del session
    _trim()
    return max(0, after - before)
