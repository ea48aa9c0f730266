"""Evaluating real ONNX models from signed bundles on a labelled export: verdicts and every refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeota.evaluation.blessing import EvaluationError, Thresholds, decide
from edgeota.evaluation.runner import ReleaseBundles, evaluate
from edgeota_contract.signing import SigningKey, TrustedKeys

from .conftest import Models, bundle_for
from .export_writer import write_export


@pytest.fixture
def export(tmp_path: Path, models: Models) -> Path:
    """The held-out digits on one profile, cohorts alternating; every tenth row has no label."""
    n = len(models.labels)
    labels = [None if i % 10 == 0 else int(models.labels[i]) for i in range(n)]
    cohorts: list[str | None] = ["north" if i % 2 else "south" for i in range(n)]
    cohorts[:7] = [None] * 7  # devices without the cohort label
    write_export(tmp_path / "export", models.images, labels, cohorts=cohorts, profiles=["x86"] * n)
    return tmp_path / "export"


def release(
    tmp_path: Path,
    models: Models,
    name: str,
    model: Path,
    version: str,
    profiles: tuple[str, ...] = ("x86",),
    **kw: Any,
) -> ReleaseBundles:
    """A release of ``model`` with one bundle per profile (``kw``: ``key`` to sign with, manifest changes)."""
    out = tmp_path / name
    return ReleaseBundles(
        name, version, {p: bundle_for(out, model, kw.pop("key", models.key), version, p, **kw) for p in profiles}
    )


def test_the_same_model_is_blessed_and_a_worse_one_is_not(
    tmp_path: Path, models: Models, export: Path, trusted: TrustedKeys
) -> None:
    baseline = release(tmp_path, models, "base", models.good, "1.0.0")
    same = release(tmp_path, models, "same", models.good, "1.1.0")
    record = evaluate(same, baseline, export, Thresholds(min_slice_rows=50, min_rows=100), trusted)
    assert record.verdict is not None and record.verdict.blessed, record.verdict
    n = len(models.labels)
    overall = record.metrics[0]
    unlabelled = len(range(0, n, 10))
    assert record.dataset.unlabelled_rows == unlabelled and record.dataset.rows == n
    assert overall.rows == n - unlabelled == record.dataset.labelled_rows
    assert overall.candidate_only == overall.baseline_only == 0
    cohorts = {m.cohort for m in record.metrics if m.level == "cohort"}
    assert cohorts == {"north", "south", None}
    assert record.candidate.bundles["x86"] != record.baseline.bundles["x86"]
    assert record.dataset.label_sources == {"feedback": overall.rows}

    worse = release(tmp_path, models, "worse", models.wrong, "1.2.0")
    record = evaluate(worse, baseline, export, Thresholds(min_slice_rows=50, min_rows=100), trusted)
    assert record.verdict is not None and not record.verdict.blessed
    assert any("cohort=north: accuracy dropped" in r for r in record.verdict.reasons)
    thin = [s for s in record.verdict.slices if s.state == "thin"]
    assert [(s.cohort, s.rows) for s in thin] == [(None, 6)]  # row 0 of the 7 has no label
    # The server's recomputation from the record alone gives the same verdict.
    assert decide(record.metrics, record.thresholds) == record.verdict
    # Every count agrees with ONNX Runtime run directly on the labelled rows of each cohort.
    labelled = [i for i in range(n) if i % 10]
    right = {
        name: _direct(path, models.images[labelled]) == models.labels[labelled]
        for name, path in (("c", models.wrong), ("b", models.good))
    }
    cohort_of = ["north" if i % 2 else "south" for i in labelled]
    for m in record.metrics:
        rows = [
            k for k, i in enumerate(labelled) if m.level != "cohort" or (m.cohort == (None if i < 7 else cohort_of[k]))
        ]
        c, b = right["c"][rows], right["b"][rows]
        assert (m.rows, m.candidate_correct, m.baseline_correct) == (len(rows), c.sum(), b.sum()), m
        assert (m.candidate_only, m.baseline_only) == ((c & ~b).sum(), (b & ~c).sum()), m
    assert record.metrics[0].baseline_correct > record.metrics[0].candidate_correct


def _direct(model: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": images})[0]).argmax(axis=1)


def test_missing_dataset_is_refused(tmp_path: Path, models: Models, trusted: TrustedKeys) -> None:
    rel = release(tmp_path, models, "a", models.good, "1.0.0")
    with pytest.raises(EvaluationError, match="is not a folder"):
        evaluate(rel, release(tmp_path, models, "b", models.good, "1.1.0"), tmp_path / "nope", Thresholds(), trusted)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match=r"no readable _manifest\.json"):
        evaluate(rel, release(tmp_path, models, "c", models.good, "1.2.0"), tmp_path / "empty", Thresholds(), trusted)


def test_a_changed_file_fails_the_digest(tmp_path: Path, models: Models, export: Path, trusted: TrustedKeys) -> None:
    part = next(export.rglob("*.parquet"))
    part.write_bytes(part.read_bytes() + b"\0")
    a = release(tmp_path, models, "a", models.good, "1.0.0")
    b = release(tmp_path, models, "b", models.good, "1.1.0")
    with pytest.raises(EvaluationError, match="does not match its sha256"):
        evaluate(a, b, export, Thresholds(), trusted)
    (export / "extra.parquet").write_bytes(b"x")
    with pytest.raises(EvaluationError, match="differ from the manifest"):
        evaluate(a, b, export, Thresholds(), trusted)


def test_a_release_without_the_datasets_profile_is_refused(
    tmp_path: Path, models: Models, export: Path, trusted: TrustedKeys
) -> None:
    base = release(tmp_path, models, "a", models.good, "1.0.0")
    arm = release(tmp_path, models, "b", models.good, "1.1.0", profiles=("arm64",))
    with pytest.raises(EvaluationError, match="candidate release b has no bundle for profile x86"):
        evaluate(arm, base, export, Thresholds(), trusted)
    with pytest.raises(EvaluationError, match="holds no rows for profiles"):
        evaluate(arm, base, export, Thresholds(), trusted, profiles={"arm64"})


def test_another_model_or_untrusted_bundle_is_refused(
    tmp_path: Path, models: Models, export: Path, trusted: TrustedKeys
) -> None:
    base = release(tmp_path, models, "a", models.good, "1.0.0")
    other = release(tmp_path, models, "b", models.good, "1.1.0", model_name="faces")
    with pytest.raises(EvaluationError, match="is model faces, the dataset is of model digits"):
        evaluate(other, base, export, Thresholds(), trusted)
    renamed = release(tmp_path, models, "c", models.good, "1.1.0", input_name="pixels")
    with pytest.raises(EvaluationError, match="not the model this data was collected for"):
        evaluate(renamed, base, export, Thresholds(), trusted)
    forged = release(tmp_path, models, "d", models.good, "1.1.0", key=SigningKey.generate())
    with pytest.raises(EvaluationError, match=r"candidate bundle for x86 .* failed verification"):
        evaluate(forged, base, export, Thresholds(), trusted)
    with pytest.raises(EvaluationError, match="same release"):
        evaluate(base, base, export, Thresholds(), trusted)
