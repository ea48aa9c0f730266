"""Samples name the prediction they came from, and a dataset export fills in the labels reported for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import pytest
from fastapi.testclient import TestClient

from ota_server.context import ServerContext
from ota_server.models import StoredSample

from .conftest import AUTH, BundleFactory, upload
from .test_dataset_samples import _api, _device, _hard, _post, _rows, _sample


@pytest.fixture
def bundle_sha(client: TestClient, make_bundle: BundleFactory) -> str:
    resp = upload(client, make_bundle("1.0.0", "x86"))
    assert resp.status_code == 201, resp.text
    return str(resp.json()["bundle_sha256"])


def _feedback(client: TestClient, sha: str, pid: str, row: int, predicted: int, label: int) -> None:
    item = {
        "prediction_id": pid,
        "row": row,
        "model_name": "digits",
        "version": "1.0.0",
        "bundle_sha256": sha,
        "predicted": str(predicted),
        "label": str(label),
    }
    resp = client.post("/api/v1/feedback", json={"device_id": "cam-1", "items": [item]}, headers=AUTH)
    assert resp.status_code == 201, resp.text


def test_export_fills_labels_from_feedback(
    client: TestClient,
    ctx: ServerContext,
    bundle_sha: str,
    tmp_path: Path,
) -> None:
    sha = bundle_sha
    dev = _device(client, "cam-1", {"cohort": "north"})
    # a uniform sample of a 2-row request, a hard sample of row 2 of a 3-row request, one without an id
    uniform = _sample(sha, 1, rows=2, meta__prediction_id=np.array("req-a"))
    hard = _hard(sha, 2, rows=1, meta__prediction_id=np.array("req-b"), meta__request_row=np.array([2]))
    for body in (uniform, hard, _sample(sha, 3, rows=1)):
        assert _post(client, "cam-1", dev, body, sha).status_code == 201
    by_id = {r.prediction_id: r for r in _rows(ctx)}
    assert by_id["req-a"].request_rows is None and by_id["req-b"].request_rows == [2] and None in by_id
    _feedback(client, sha, "req-a", 1, predicted=1, label=7)
    _feedback(client, sha, "req-b", 2, predicted=0, label=4)
    _feedback(client, sha, "req-b", 0, predicted=0, label=9)  # a row the sample does not hold
    _api(client).export_dataset(tmp_path / "out", "digits")
    rows = pads.dataset(tmp_path / "out", format="parquet", partitioning="hive").to_table().to_pylist()
    got = sorted((r["stream"], r["row"], r["label"], r["label_source"]) for r in rows)
    assert got == [
        ("hard", 0, 4, "feedback"),
        ("uniform", 0, None, None),
        ("uniform", 0, None, None),
        ("uniform", 1, 7, "feedback"),
    ]


@pytest.mark.parametrize(
    ("members", "status"),
    [
        ({"meta__prediction_id": np.array("has space")}, 422),
        ({"meta__prediction_id": np.array(["a", "b"])}, 422),
        ({"meta__request_row": np.array([0, 1])}, 422),  # rows without an id
        ({"meta__prediction_id": np.array("p"), "meta__request_row": np.array([0])}, 422),  # 1 row for 2
        ({"meta__prediction_id": np.array("p"), "meta__request_row": np.array([0, -1])}, 422),
        ({"meta__prediction_id": np.array("p"), "meta__request_row": np.array([0.0, 1.0])}, 422),
    ],
)
def test_bad_prediction_refs_are_refused(
    client: TestClient,
    ctx: ServerContext,
    bundle_sha: str,
    members: dict[str, Any],
    status: int,
) -> None:
    sha = bundle_sha
    dev = _device(client, "cam-1")
    resp = _post(client, "cam-1", dev, _sample(sha, 0, **members), sha)
    assert resp.status_code == status, resp.text
    with ctx.sessions() as session:
        assert session.query(StoredSample).count() == 0
