"""The retrain script's ``since``: only rows devices served at or after it (the export's ``time`` column), since an
export's window is on arrival and samples taken before a fault can arrive after it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from packager.examples.retrain_digits import RetrainError, main, read_export

FAULT = datetime(2026, 12, 7, 9, 15, tzinfo=UTC)


def _export(folder: Path, times: list[datetime], labels: list[int]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ota_server.services.datasets import dataset_schema

    n = len(times)
    cols = {
        "input_input": [[float(i)] * 64 for i in range(n)],  # row i holds the value i: which rows were kept shows
        "prediction": [0] * n,
        "confidence": [0.5] * n,
        "label": labels,
        "label_source": ["feedback"] * n,
        "device_id": ["d1"] * n,
        "hardware_profile": ["rpi4"] * n,
        "model_name": ["digits"] * n,
        "version": ["1.1.0"] * n,
        "time": times,
        "received_at": [FAULT + timedelta(seconds=30)] * n,  # all arrived after the fault
        "stream": ["uniform"] * n,
        "reason": [None] * n,
        "sample_sha256": ["0" * 64] * n,
        "row": list(range(n)),
    }
    part = folder / "release=r1" / "cohort=north"
    part.mkdir(parents=True)
    schema = dataset_schema({"input": np.dtype(np.float32)})
    pq.write_table(pa.Table.from_pydict(cols, schema=schema), part / "part-0.parquet")
    (folder / "_manifest.json").write_text(json.dumps({"format": "edgeota-dataset/1"}))


def test_since_keeps_the_rows_served_from_then_on(tmp_path: Path) -> None:
    times = [FAULT + timedelta(seconds=s) for s in (-10, -1, 0, 5, 12)]
    _export(tmp_path / "e", times, [1, 2, 3, 4, 5])
    rows = read_export(tmp_path / "e", "north", since=FAULT)
    assert rows.inputs[:, 0].tolist() == [2.0, 3.0, 4.0] and rows.labels.tolist() == [3, 4, 5]
    assert len(read_export(tmp_path / "e", "north").inputs) == 5  # without since: every row


def test_since_rejections(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _export(tmp_path / "e", [FAULT - timedelta(seconds=5)], [1])
    with pytest.raises(RetrainError, match="no rows for cohort north served since 2026-12-07T09:15:00"):
        read_export(tmp_path / "e", "north", since=FAULT)
    with pytest.raises(RetrainError, match="needs a time zone"):
        read_export(tmp_path / "e", "north", since=FAULT.replace(tzinfo=None))
    assert main(["--export", str(tmp_path / "e"), "--out", str(tmp_path / "o"), "--since", "yesterday"]) == 2
    assert capsys.readouterr().err.strip() == "error: --since 'yesterday' is not an ISO time"
    assert main(["--export", str(tmp_path / "e"), "--out", str(tmp_path / "o"), "--since", FAULT.isoformat()]) == 2
    assert "served since" in capsys.readouterr().err
