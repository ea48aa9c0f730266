"""Task-aware fidelity measures (packager.fidelity) on constructed outputs, and the gates they drive."""

from __future__ import annotations

import numpy as np
import pytest

from packager.errors import PackagerError
from packager.evaluate import quality_metrics
from packager.fidelity import (
    box_iou_matrix,
    class_mask_iou,
    infer_kind,
    mask_iou,
    match_boxes,
    mean_cosine,
    output_kinds,
    task_metrics,
    top1_agreement,
)
from packager.gates import quality_gates
from packager.profiles import load_profile


def test_top1_agreement_counts_argmax_matches_and_nan_never_agrees() -> None:
    ref = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    cand = np.array([[0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [np.nan, np.nan]])
    assert top1_agreement(cand, ref) == pytest.approx(0.5)
    assert top1_agreement(ref, ref) == 1.0


def test_mask_iou_thresholds_each_sample_and_empty_pairs_count_one() -> None:
    ref = np.zeros((3, 1, 4, 4))
    ref[0, 0, :2, :2] = 0.9  # 4 pixels
    ref[1, 0, 0, :] = 0.8  # 4 pixels
    cand = ref.copy()
    cand[0, 0, 0, 0] = 0.1  # loses one of four: IoU 3/4
    cand[1, 0, 1, :] = 0.5  # adds four: IoU 4/8
    iou, agree = mask_iou(cand, ref, threshold=0.3)  # sample 2: both empty -> 1
    assert iou == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert agree == pytest.approx(1 - 5 / 48)
    nan = cand.copy()
    nan[0] = np.nan
    assert mask_iou(nan, ref, 0.3)[0] == pytest.approx((0.0 + 0.5 + 1.0) / 3)


def test_class_mask_iou_is_mean_over_present_classes() -> None:
    ref = np.zeros((1, 3, 2, 2))
    ref[0, 0] = 1.0  # every pixel class 0
    cand = ref.copy()
    cand[0, 2, 0, 0] = 5.0  # one pixel becomes class 2
    iou, agree = class_mask_iou(cand, ref)
    assert iou == pytest.approx((3 / 4 + 0.0) / 2)
    assert agree == pytest.approx(3 / 4)


def test_box_matching_iou_and_score_agreement() -> None:
    ref_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 1, 1]], dtype=float)
    ref_scores = np.array([0.9, 0.8, 0.1])  # the third is below the threshold
    cand_boxes = np.array([[20, 20, 30, 30], [0, 0, 10, 5]], dtype=float)  # swapped order; one box half height
    cand_scores = np.array([0.7, 0.9])
    iou, agree = match_boxes(cand_boxes, cand_scores, ref_boxes, ref_scores, threshold=0.5)
    assert iou == pytest.approx((1.0 + 0.5) / 2)
    assert agree == pytest.approx((1.0 + 0.9) / 2)
    # a missed box counts 0 over the larger count; no boxes on either side is perfect
    assert match_boxes(cand_boxes[:1], cand_scores[:1], ref_boxes, ref_scores, 0.5)[0] == pytest.approx(0.5)
    assert match_boxes(cand_boxes, np.zeros(2), ref_boxes, np.zeros(3), 0.5) == (1.0, 1.0)
    assert match_boxes(cand_boxes, cand_scores, ref_boxes, np.zeros(3), 0.5) == (0.0, 0.0)
    assert box_iou_matrix(ref_boxes[:1], ref_boxes[1:2])[0, 0] == 0.0


def test_mean_cosine_of_embeddings() -> None:
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    cand = np.array([[1.0, 1.0], [0.0, 3.0]])
    assert mean_cosine(cand, ref) == pytest.approx((1 / np.sqrt(2) + 1.0) / 2)


def test_kinds_are_inferred_from_shape_or_declared() -> None:
    assert infer_kind(np.zeros((4, 10))) == "class_scores"
    assert infer_kind(np.zeros((4, 1, 8, 8))) == "score_map"
    assert infer_kind(np.zeros((4, 1))) == "generic"
    assert infer_kind(np.zeros((2, 4, 3))) == "generic"
    kinds = output_kinds(["a", "b"], [np.zeros((4, 10)), np.zeros((4, 16))], {"b": "embedding"})
    assert kinds == {"a": "class_scores", "b": "embedding"}
    with pytest.raises(PackagerError, match="unknown output kind 'boxes'"):
        output_kinds(["a"], [np.zeros((4, 10))], {"a": "boxes"})
    with pytest.raises(PackagerError, match="'zz', which is not an output"):
        output_kinds(["a"], [np.zeros((4, 10))], {"zz": "generic"})


def test_detection_pairs_boxes_with_scores() -> None:
    rng = np.random.default_rng(0)
    xy = np.stack([np.arange(5) * 30.0, np.zeros(5)], axis=-1)[None].repeat(3, axis=0)  # apart: one match each
    boxes = np.concatenate([xy, xy + 10], axis=-1)
    scores = rng.uniform(0.6, 1.0, (3, 5))
    kinds = {"b": "detection_boxes", "s": "detection_scores"}
    same = task_metrics([boxes, scores], [boxes, scores], ["b", "s"], kinds, 0.5)  # type: ignore[arg-type]
    assert same["box_iou"] == 1.0 and same["score_agreement"] == 1.0 and same["tensor_outputs"] == 0
    shifted = task_metrics([boxes + 5, scores], [boxes, scores], ["b", "s"], kinds, 0.5)  # type: ignore[arg-type]
    assert shifted["box_iou"] == pytest.approx(25 / 175)  # 5x5 overlap of two 10x10 boxes


def test_score_map_gated_by_mask_iou_not_cosine() -> None:
    """A score map whose raw values drift (cosine/SQNR poor) but whose mask holds passes; a broken mask fails."""
    rng = np.random.default_rng(1)
    ref = rng.uniform(0, 0.2, (6, 1, 16, 16))
    ref[:, :, 4:10, 2:14] = rng.uniform(0.7, 1.0, (6, 1, 6, 12))
    drift = np.clip(ref * 0.6 + 0.1, 0, 1)  # same mask at 0.3, very different values
    profile = load_profile("x86-avx2")
    m = quality_metrics([drift], [ref], None, ["score_map"], profile.accuracy.score_threshold)
    assert m["mask_iou"] == 1.0 and m["sqnr_db"] < 20
    gates = {g.name: g for g in quality_gates(profile, m, None, "fidelity")}
    assert gates["fidelity_mask_iou"].ok and "fidelity_cosine" not in gates and "fidelity_sqnr" not in gates
    broken = ref.copy()
    broken[:, :, 4:7] = 0.0  # half of every text region lost
    m = quality_metrics([broken], [ref], None, ["score_map"], profile.accuracy.score_threshold)
    gate = next(g for g in quality_gates(profile, m, None, "fidelity") if g.name == "fidelity_mask_iou")
    assert not gate.ok and gate.value == pytest.approx(0.5) and gate.threshold == profile.accuracy.min_mask_iou


def test_without_kinds_the_generic_gates_are_unchanged() -> None:
    ref = np.random.default_rng(2).normal(size=(8, 10))
    m = quality_metrics([ref + 0.01], [ref], None)
    names = [g.name for g in quality_gates(load_profile("x86-avx2"), m, None, "fidelity")]
    assert names == ["finite_outputs", "fidelity_top1", "fidelity_cosine", "fidelity_sqnr"]
    with_kinds = quality_metrics([ref + 0.01], [ref], None, ["class_scores"])
    assert {k: with_kinds[k] for k in m} == m  # class scores keep cosine/SQNR beside top-1


def test_task_thresholds_in_signed_manifest_only_when_set() -> None:
    """New GateOverrides fields stay out of the signed bytes unless set (older readers refuse unknown keys)."""
    import json
    from datetime import UTC, datetime

    from edgeota_contract.manifest import BundleManifest, FileEntry, GateOverrides, Lineage

    fields: dict[str, object] = dict(
        model_name="det", version="1.0.0", release_counter=1_000_000, hardware_profile="x86-avx2",
        files=[FileEntry(name=n, size=1, sha256="b" * 64)
               for n in ("model.onnx", "reference_stats.json", "test_vectors.npz", "model_card.md")],
        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 3, 8, 8]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 1, 8, 8]}],
        opset=17, execution_provider="CPUExecutionProvider", recipe="int8-qdq", signing_key_id="0" * 16,
        lineage=Lineage(source_model_sha256="a" * 64, packager_version="0.1.0",
                        created_at=datetime(2026, 1, 1, tzinfo=UTC), created_by="t"),
    )  # fmt: skip
    old = json.loads(BundleManifest(**fields, gate_overrides=GateOverrides(min_cosine=0.9)).canonical_bytes())
    assert set(old["gate_overrides"]) == {
        "latency_budget_ms", "max_accuracy_drop", "min_top1_agreement", "min_cosine", "min_sqnr_db"
    }  # fmt: skip
    new = BundleManifest(**fields, gate_overrides=GateOverrides(min_mask_iou=0.93)).canonical_bytes()
    data = json.loads(new)
    assert data["gate_overrides"]["min_mask_iou"] == 0.93 and "min_box_iou" not in data["gate_overrides"]
    assert BundleManifest.parse(new).gate_overrides == GateOverrides(min_mask_iou=0.93)
    with pytest.raises(ValueError):
        GateOverrides(min_mask_iou=1.5)
