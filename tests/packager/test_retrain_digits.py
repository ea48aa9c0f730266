"""The retrain script reads a dataset export (the export's own Parquet schema and layout) and retrains."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from edgeota.fleet.load import Drift, InputSampler, digits_labels, digits_pool
from edgeota_contract.manifest import TensorSpec
from packager.examples.retrain_digits import RetrainError, main, read_export, retrain_from_export


def _write_export(folder: Path, cohorts: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ota_server.services.datasets import dataset_schema

    schema = dataset_schema({"input": np.dtype(np.float32)})
    now = datetime(2026, 12, 7, tzinfo=UTC)
    for cohort, (x, y) in cohorts.items():
        n = len(x)
        cols = {
            "input_input": [list(map(float, row)) for row in x],
            "prediction": [0] * n,
            "confidence": [0.5] * n,
            "label": [None if v < 0 else int(v) for v in y],
            "label_source": [None if v < 0 else "feedback" for v in y],
            "device_id": ["d1"] * n,
            "hardware_profile": ["rpi4"] * n,
            "model_name": ["digits"] * n,
            "version": ["1.1.0"] * n,
            "time": [now] * n,
            "received_at": [now] * n,
            "stream": ["uniform"] * n,
            "reason": [None] * n,
            "sample_sha256": ["0" * 64] * n,
            "row": list(range(n)),
        }
        part = folder / "release=r1" / f"cohort={cohort}"
        part.mkdir(parents=True)
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), part / "part-0.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"format": "edgeota-dataset/1"}))


def _shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Digits whose top two pixel rows read bright (a sensor fault on one cohort)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(digits_pool()), n, replace=False)
    x = np.array(digits_pool()[idx])
    x[:, :16] = np.clip(x[:, :16] + 0.9, 0, 1.5)
    return x.astype(np.float32), np.asarray(digits_labels()[idx])


def test_retrain_on_export_learns_the_shifted_cohort(tmp_path: Path) -> None:
    x, y = _shifted(400, 1)
    y_partly = y.copy()
    y_partly[::4] = -1  # a quarter of the rows never got a label
    unlabelled = np.full(50, -1)
    _write_export(tmp_path / "export", {"north": (x, y_partly), "south": (x[:50], unlabelled)})

    rows = read_export(tmp_path / "export", "north")
    assert rows.inputs.shape == (400, 64) and int((rows.labels >= 0).sum()) == 300

    result = retrain_from_export(tmp_path / "export", tmp_path / "model", cohort="north", epochs=200)
    assert result.labelled_rows == 300 and result.exported_rows == 400
    assert result.accuracy_on_exported is not None and result.accuracy_on_exported > 0.85
    assert result.accuracy_on_original > 0.9
    calib = np.load(result.calibration_path)["input"]
    assert calib.shape == (200, 64)
    # The reference data is the cohort's shifted inputs, so drift is measured against what it sees now.
    assert float(calib[:, :16].mean()) > 0.8


def test_rejections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RetrainError, match="not a dataset export"):
        read_export(tmp_path)
    x, _ = _shifted(20, 2)
    _write_export(tmp_path / "unlabelled", {"north": (x, np.full(20, -1))})
    with pytest.raises(RetrainError, match="no exported row has a label"):
        retrain_from_export(tmp_path / "unlabelled", tmp_path / "out")
    with pytest.raises(RetrainError, match="no rows for cohort west"):
        read_export(tmp_path / "unlabelled", "west")
    assert main(["--export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_sampler_labels_and_single_feature_drift() -> None:
    spec = TensorSpec(name="input", dtype="float32", shape=["N", 64])
    sampler = InputSampler([spec], {"input": digits_pool()}, seed=3)
    sampler._natural = {"input": sampler._pools["input"]}
    x, labels = sampler.sample_labelled(500)
    assert labels is not None and labels.shape == (500,)
    # Each label is the digit of the row drawn: find each row in the pool.
    pool = digits_pool()
    first = int(np.flatnonzero((pool == x["input"][0]).all(axis=1))[0])
    assert digits_labels()[first] == labels[0]
    drifted, _ = sampler.sample_labelled(2000, Drift(shift=3.0, features=(20,)))
    plain, _ = sampler.sample_labelled(2000)
    assert drifted["input"][:, 20].mean() > plain["input"][:, 20].mean() + 0.5
    assert abs(drifted["input"][:, 21].mean() - plain["input"][:, 21].mean()) < 0.05
