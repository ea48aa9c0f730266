"""Running a candidate and a baseline release on an exported dataset: the evaluation record.

:func:`evaluate` verifies both releases' bundles (release signature, every file digest, the hardware
profile), checks that they are the dataset's model with the dataset's inputs, runs each profile's two
models with ONNX Runtime on that profile's labelled rows, counts per cohort x profile, per profile and
overall, and decides the blessing (:func:`edgeota.evaluation.blessing.decide`).

The models are classifiers: a row's prediction is the argmax of the first output's class axis (``[N, C]``,
C >= 2), or ``score >= 0.5`` for one score per row (``[N]`` or ``[N, 1]``). Inputs are fed samples-first
in the bundle's dtype, in batches of the model's fixed batch (the last one padded) or of 256.

Imports onnxruntime, pyarrow and numpy when it runs; nothing of the server.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgeota.evaluation.blessing import EvaluationError, SliceMetrics, Thresholds, decide
from edgeota.evaluation.dataset import LabelledDataset, ProfileRows, load_labelled
from edgeota.evaluation.record import DatasetRef, EvaluationRecord, ReleaseRef
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import MODEL_FILE, BundleManifest
from edgeota_contract.signing import TrustedKeys

BATCH = 256
_DTYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class ReleaseBundles:
    """One release to evaluate: its id, version and a local bundle file per hardware profile."""

    release_id: str
    version: str
    bundles: Mapping[str, Path]


@dataclass(frozen=True)
class _Model:
    manifest: BundleManifest
    sha256: str
    session: Any


def _load_model(
    role: str, release: ReleaseBundles, profile: str, trusted: TrustedKeys, model_name: str, work: Path
) -> _Model:
    path = release.bundles.get(profile)
    if path is None:
        raise EvaluationError(
            f"{role} release {release.release_id} has no bundle for profile {profile}, which the dataset holds; "
            "select the profiles to evaluate with --profile"
        )
    dest = work / f"{role}-{profile}"
    try:
        verified = verify_bundle(path, trusted, expected_profile=profile, extract_to=dest)
    except EdgeotaError as exc:
        raise EvaluationError(f"{role} bundle for {profile} ({path.name}) failed verification: {exc}") from exc
    m = verified.manifest
    if m.model_name != model_name:
        raise EvaluationError(
            f"{role} release {release.release_id} is model {m.model_name}, the dataset is of model {model_name}"
        )
    if m.version != release.version:
        raise EvaluationError(f"{role} bundle for {profile} is version {m.version}, not {release.version}")
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # reproducible figures, as the packager's quality runs
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(dest / MODEL_FILE), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime raises its own exception types
        raise EvaluationError(f"{role} model for {profile} cannot be loaded: {str(exc).splitlines()[0][:300]}") from exc
    return _Model(m, verified.archive_sha256, session)


def _check_inputs(role: str, model: _Model, rows: ProfileRows) -> None:
    want = {t.name for t in model.manifest.inputs}
    have = set(rows.inputs)
    if want != have:
        raise EvaluationError(
            f"{role} model for {model.manifest.hardware_profile} takes inputs {sorted(want)}, "
            f"the dataset holds {sorted(have)}: not the model this data was collected for"
        )


def predict(model: _Model, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Top-1 class per row (see the module doc). Raises EvaluationError when the model fails or its first
    output is not class scores."""
    specs = {t.name: t for t in model.manifest.inputs}
    n = len(next(iter(inputs.values())))
    first = specs[next(iter(inputs))].shape
    fixed = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
    step = fixed or BATCH
    out_name = model.manifest.outputs[0].name
    preds: list[np.ndarray] = []
    for start in range(0, n, step):
        real = min(step, n - start)
        feed: dict[str, np.ndarray] = {}
        for name, arr in inputs.items():
            dtype = _DTYPES.get(specs[name].dtype)
            if dtype is None:
                raise EvaluationError(f"input {name!r} of dtype {specs[name].dtype} is not supported here")
            rows = arr[start : start + step].astype(dtype, copy=False)
            if fixed is not None and real < fixed:
                rows = np.concatenate([rows, np.repeat(rows[-1:], fixed - real, axis=0)])
            feed[name] = np.ascontiguousarray(rows)
        try:
            (scores,) = model.session.run([out_name], feed)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise EvaluationError(
                f"model for {model.manifest.hardware_profile} failed on the dataset: {str(exc).splitlines()[0][:300]}"
            ) from exc
        scores = np.asarray(scores)[:real]
        if scores.ndim == 2 and scores.shape[1] >= 2:
            preds.append(np.nan_to_num(scores, nan=-np.inf).argmax(axis=1))
        elif scores.ndim == 1 or (scores.ndim == 2 and scores.shape[1] == 1):
            preds.append((np.nan_to_num(scores.reshape(-1), nan=-np.inf) >= 0.5).astype(np.int64))
        else:
            raise EvaluationError(f"output {out_name!r} of shape {list(scores.shape)} is not class scores")
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def _counts(level: Any, profile: str | None, cohort: str | None, cand: np.ndarray, base: np.ndarray) -> SliceMetrics:
    return SliceMetrics(
        level=level,
        profile=profile,
        cohort=cohort,
        rows=len(cand),
        candidate_correct=int(cand.sum()),
        baseline_correct=int(base.sum()),
        candidate_only=int((cand & ~base).sum()),
        baseline_only=int((base & ~cand).sum()),
    )


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def slice_metrics(
    correct: Mapping[str, tuple[np.ndarray, np.ndarray, list[str | None]]],
) -> list[SliceMetrics]:
    """Paired counts per cohort x profile, per profile and overall, from each profile's (candidate right,
    baseline right, cohort) per row."""
    metrics: list[SliceMetrics] = []
    all_c: list[np.ndarray] = []
    all_b: list[np.ndarray] = []
    for profile, (cand, base, cohorts) in sorted(correct.items()):
        metrics.append(_counts("profile", profile, None, cand, base))
        for value in sorted(set(cohorts), key=lambda c: (c is None, c or "")):
            mask = np.fromiter((c == value for c in cohorts), dtype=bool, count=len(cohorts))
            metrics.append(_counts("cohort", profile, value, cand[mask], base[mask]))
        all_c.append(cand)
        all_b.append(base)
    metrics.insert(0, _counts("overall", None, None, _cat(all_c), _cat(all_b)))
    return metrics


def evaluate(
    candidate: ReleaseBundles,
    baseline: ReleaseBundles,
    dataset: Path,
    thresholds: Thresholds,
    trusted: TrustedKeys,
    *,
    profiles: set[str] | None = None,
    now: datetime | None = None,
) -> EvaluationRecord:
    """Evaluate ``candidate`` against ``baseline`` on the export in ``dataset``; returns the record with its verdict.

    Raises:
        EvaluationError: the dataset fails its digest or holds no rows of the selected profiles, a release lacks
            a bundle for a profile in the data, a bundle fails verification or is another model or version,
            a model's inputs differ from the dataset's, or a model fails to run.
    """
    if candidate.release_id == baseline.release_id:
        raise EvaluationError("candidate and baseline are the same release")
    data: LabelledDataset = load_labelled(dataset, profiles)
    if not data.rows_per_profile:
        wanted = f" for profiles {sorted(profiles)}" if profiles else ""
        raise EvaluationError(f"dataset {dataset} holds no rows{wanted}")
    correct: dict[str, tuple[np.ndarray, np.ndarray, list[str | None]]] = {}
    used: dict[str, dict[str, str]] = {"candidate": {}, "baseline": {}}
    with tempfile.TemporaryDirectory(prefix="edgeota-eval-") as tmp:
        for profile in sorted(data.rows_per_profile):
            rows = data.profiles[profile]
            right: dict[str, np.ndarray] = {}
            for role, release in (("candidate", candidate), ("baseline", baseline)):
                model = _load_model(role, release, profile, trusted, data.model_name, Path(tmp))
                _check_inputs(role, model, rows)
                used[role][profile] = model.sha256
                right[role] = predict(model, rows.inputs) == rows.labels if len(rows.labels) else np.zeros(0, bool)
            correct[profile] = (right["candidate"], right["baseline"], rows.cohorts)
    metrics = slice_metrics(correct)
    m = data.manifest
    record = EvaluationRecord(
        model_name=data.model_name,
        candidate=ReleaseRef(release_id=candidate.release_id, version=candidate.version, bundles=used["candidate"]),
        baseline=ReleaseRef(release_id=baseline.release_id, version=baseline.version, bundles=used["baseline"]),
        dataset=DatasetRef(
            digest=data.digest,
            model_name=data.model_name,
            created_at=m.get("created_at"),
            trigger=m.get("trigger"),
            rows=data.rows,
            labelled_rows=metrics[0].rows,
            unlabelled_rows=data.unlabelled,
            unusable_rows=data.unusable,
            label_sources=dict(data.label_sources),
        ),
        thresholds=thresholds,
        metrics=metrics,
        evaluated_at=(now or datetime.now(UTC)).isoformat(),
    )
    return record.model_copy(update={"verdict": decide(metrics, thresholds)})
