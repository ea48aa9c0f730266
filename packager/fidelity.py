"""Task-aware fidelity: judge a candidate's outputs against the fp32 outputs by what the task needs.

Each model output has a kind, declared (model config ``output_kinds``, ``--output-kind``,
``PackageRequest.output_kinds``) or inferred from its shape (samples first):

- ``class_scores`` (inferred: 2-D ``[N, C]``, ``C > 1``): top-1 agreement.
- ``score_map`` (inferred: 4-D ``[N, 1, H, W]``): maps thresholded at ``score_threshold``; mean
  per-sample mask IoU (both empty counts 1) and pixel agreement. A detector whose raw output
  needs model-specific decoding (DBNet text detectors) is judged through its score map.
- ``mask`` (declared): ``[N, C, H, W]``; ``C == 1`` as a score map, else the per-pixel argmax:
  mean IoU over the classes present, and pixel agreement.
- ``detection_boxes`` / ``detection_scores`` (declared): ``[N, K, 4]`` boxes (x1, y1, x2, y2) and
  ``[N, K]`` scores, paired in order; boxes scoring at least ``score_threshold`` are matched
  greedily by IoU: ``box_iou`` is the matched IoU sum over the larger box count (misses and extras
  count 0), ``score_agreement`` is ``1 - |score difference|`` averaged over the matched pairs.
- ``embedding`` (declared): mean cosine per sample.
- ``generic``: every other output; judged by cosine and SQNR (as are class scores, beside top-1).

All functions are pure: arrays in, floats out. Unknown kinds raise :class:`PackagerError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, get_args

import numpy as np

from packager.errors import PackagerError

OutputKind = Literal["class_scores", "score_map", "mask", "detection_boxes", "detection_scores", "embedding", "generic"]
OUTPUT_KINDS: tuple[str, ...] = get_args(OutputKind)
# Outputs judged by cosine/SQNR over the raw tensor (class scores keep them beside top-1).
TENSOR_KINDS = frozenset({"generic", "class_scores"})


def check_kind(kind: str, label: str = "output kind") -> OutputKind:
    """``kind`` if it is one of :data:`OUTPUT_KINDS`; raises :class:`PackagerError` naming the known ones."""
    if kind not in OUTPUT_KINDS:
        raise PackagerError(f"{label}: unknown output kind {kind!r} (known: {', '.join(OUTPUT_KINDS)})")
    return kind  # type: ignore[return-value]


def infer_kind(reference: np.ndarray) -> OutputKind:
    """The kind of one output (samples first) from its shape: class scores, score map, else generic."""
    if reference.ndim == 2 and reference.shape[1] > 1:
        return "class_scores"
    if reference.ndim == 4 and reference.shape[1] == 1:
        return "score_map"
    return "generic"


def output_kinds(
    names: Sequence[str], reference: Sequence[np.ndarray], declared: Mapping[str, str] | None
) -> dict[str, OutputKind]:
    """Every output's kind: the declared one, else :func:`infer_kind`.

    Raises:
        PackagerError: a declared name that is not an output of the model, or an unknown kind.
    """
    declared = dict(declared or {})
    unknown = sorted(set(declared) - set(names))
    if unknown:
        raise PackagerError(f"output_kinds names {unknown[0]!r}, which is not an output (outputs: {', '.join(names)})")
    return {
        name: check_kind(declared[name], f"output {name}") if name in declared else infer_kind(ref)
        for name, ref in zip(names, reference, strict=True)
    }


def top1_agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Share of samples whose argmax over the last axis agrees (NaN rows never agree)."""
    cand = candidate.reshape(len(candidate), -1)
    ref = reference.reshape(len(reference), -1)
    finite = np.isfinite(cand).all(axis=1)
    agree = (np.nan_to_num(cand, nan=-np.inf).argmax(axis=1) == ref.argmax(axis=1)) & finite
    return float(agree.mean()) if len(ref) else 1.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum()) / union


def mask_iou(candidate: np.ndarray, reference: np.ndarray, threshold: float) -> tuple[float, float]:
    """(mean per-sample IoU, pixel agreement) of score maps thresholded at ``threshold`` (``>=``).

    A sample where neither map has a pixel at or above the threshold has IoU 1. NaN is below any threshold.
    """
    cand = np.nan_to_num(candidate, nan=-np.inf).reshape(len(candidate), -1) >= threshold
    ref = reference.reshape(len(reference), -1) >= threshold
    if not len(ref):
        return 1.0, 1.0
    ious = [_iou(c, r) for c, r in zip(cand, ref, strict=True)]
    return float(np.mean(ious)), float((cand == ref).mean())


def class_mask_iou(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean IoU over the classes present in either, pixel agreement) of per-pixel argmax over axis 1."""
    cand = np.nan_to_num(candidate, nan=-np.inf).argmax(axis=1)
    ref = reference.argmax(axis=1)
    ious = []
    for cls in np.union1d(np.unique(cand), np.unique(ref)):
        ious.append(_iou(cand == cls, ref == cls))
    return (float(np.mean(ious)) if ious else 1.0), (float((cand == ref).mean()) if ref.size else 1.0)


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a`` ``[n, 4]`` with every box of ``b`` ``[m, 4]`` (x1, y1, x2, y2)."""
    a = a.astype(np.float64).reshape(-1, 4)
    b = b.astype(np.float64).reshape(-1, 4)
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-30), 0.0)


def match_boxes(
    cand_boxes: np.ndarray,
    cand_scores: np.ndarray,
    ref_boxes: np.ndarray,
    ref_scores: np.ndarray,
    threshold: float,
) -> tuple[float, float]:
    """(matched IoU, score agreement) of one sample's detections; see the module doc.

    Boxes below ``threshold`` (or non-finite) are dropped first; greedy one-to-one matching by IoU
    (pairs with IoU 0 are not matched). No box on either side gives (1, 1).
    """
    ck = np.isfinite(cand_scores) & (cand_scores >= threshold) & np.isfinite(cand_boxes).all(axis=-1)
    rk = ref_scores >= threshold
    cb, cs, rb, rs = cand_boxes[ck], cand_scores[ck], ref_boxes[rk], ref_scores[rk]
    if len(cb) == 0 and len(rb) == 0:
        return 1.0, 1.0
    if len(cb) == 0 or len(rb) == 0:
        return 0.0, 0.0
    iou = box_iou_matrix(rb, cb)
    total, agree = 0.0, []
    while True:
        r, c = np.unravel_index(int(iou.argmax()), iou.shape)
        if iou[r, c] <= 0:
            break
        total += float(iou[r, c])
        agree.append(1.0 - min(1.0, abs(float(rs[r]) - float(cs[c]))))
        iou[r, :] = 0.0
        iou[:, c] = 0.0
    return total / max(len(rb), len(cb)), (float(np.mean(agree)) if agree else 0.0)


def mean_cosine(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Mean per-sample cosine similarity (two all-zero rows count 1; NaN rows give NaN)."""
    cand = candidate.reshape(len(candidate), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    dot = (cand * ref).sum(axis=1)
    norms = np.linalg.norm(cand, axis=1) * np.linalg.norm(ref, axis=1)
    return float(np.where(norms > 0, dot / np.maximum(norms, 1e-30), 1.0).mean()) if len(ref) else 1.0


def sqnr_db(candidate: np.ndarray, reference: np.ndarray) -> float:
    """10 log10(signal power / noise power) over every value; 200 dB when identical."""
    noise = float(((candidate.astype(np.float64) - reference) ** 2).sum())
    signal = float((reference.astype(np.float64) ** 2).sum())
    return 200.0 if noise == 0 else float(10 * math.log10(max(signal, 1e-30) / noise))


def task_metrics(
    outputs: Sequence[np.ndarray],
    reference: Sequence[np.ndarray],
    names: Sequence[str],
    kinds: Mapping[str, OutputKind],
    score_threshold: float,
) -> dict[str, float]:
    """Task measures over the outputs whose kind has one; the worst output counts when a kind repeats.

    Keys (only for kinds present): ``top1_agreement``, ``mask_iou`` and ``mask_agreement``,
    ``box_iou`` and ``score_agreement``, ``embedding_cosine``; ``tensor_outputs`` counts the outputs
    judged by cosine/SQNR (:data:`TENSOR_KINDS`).
    """
    found: dict[str, list[float]] = {}

    def put(key: str, value: float) -> None:
        found.setdefault(key, []).append(value)

    boxes = [i for i, n in enumerate(names) if kinds[n] == "detection_boxes"]
    scores = [i for i, n in enumerate(names) if kinds[n] == "detection_scores"]
    for i, name in enumerate(names):
        kind, cand, ref = kinds[name], outputs[i], reference[i]
        if kind == "class_scores":
            put("top1_agreement", top1_agreement(cand, ref))
        elif kind == "score_map" or (kind == "mask" and (ref.ndim < 2 or ref.shape[1] == 1)):
            iou, agree = mask_iou(cand, ref, score_threshold)
            put("mask_iou", iou)
            put("mask_agreement", agree)
        elif kind == "mask":
            iou, agree = class_mask_iou(cand, ref)
            put("mask_iou", iou)
            put("mask_agreement", agree)
        elif kind == "embedding":
            put("embedding_cosine", mean_cosine(cand, ref))
    for j, bi in enumerate(boxes):
        si = scores[j] if j < len(scores) else None
        cb, rb = outputs[bi].reshape(len(outputs[bi]), -1, 4), reference[bi].reshape(len(reference[bi]), -1, 4)
        if si is not None:
            cs = outputs[si].reshape(len(cb), -1)
            rs = reference[si].reshape(len(rb), -1)
        else:  # boxes without scores: every box counts, fully confident
            cs, rs = np.ones(cb.shape[:2]), np.ones(rb.shape[:2])
        pairs = [match_boxes(cb[k], cs[k], rb[k], rs[k], score_threshold) for k in range(len(rb))]
        put("box_iou", float(np.mean([p[0] for p in pairs])) if pairs else 1.0)
        put("score_agreement", float(np.mean([p[1] for p in pairs])) if pairs else 1.0)
    metrics = {k: min(v) for k, v in found.items()}
    metrics["tensor_outputs"] = float(sum(1 for n in names if kinds[n] in TENSOR_KINDS))
    return metrics
