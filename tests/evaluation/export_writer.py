"""A labelled dataset export written as ``edgeota dataset export`` writes one (same schema, layout, digest).

The server's export (:mod:`ota_server.services.datasets`) fills ``label`` from feedback; these tests need
labels today, so they write the folder with the server's own schema (:func:`dataset_schema`), partition
paths and digest rule.
"""

from __future__ import annotations

import hashlib
import json
import urllib.parse
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from ota_server.services.datasets import MANIFEST_FORMAT, MANIFEST_NAME, NULL_PARTITION, dataset_schema


def write_export(
    out: Path,
    inputs: np.ndarray,
    labels: list[int | None],
    *,
    cohorts: list[str | None],
    profiles: list[str],
    model_name: str = "digits",
    version: str = "1.0.0",
    release_id: str = "rel-serving",
    input_name: str = "input",
) -> dict[str, Any]:
    """Write ``inputs`` (one row each) with ``labels`` (None: unlabelled), cohorts and profiles; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dtype = np.dtype(inputs.dtype)
    schema = dataset_schema({input_name: dtype})
    groups: dict[str | None, list[int]] = defaultdict(list)
    for i, cohort in enumerate(cohorts):
        groups[cohort].append(i)
    t0 = datetime(2026, 12, 1, tzinfo=UTC)
    files: list[dict[str, Any]] = []
    parts: list[tuple[str, bytes, int, str | None]] = []
    for cohort, idx in groups.items():
        value = NULL_PARTITION if cohort is None else urllib.parse.quote(cohort, safe="")
        rel = f"release={urllib.parse.quote(release_id, safe='')}/cohort={value}/part-0.parquet"
        cols: dict[str, list[Any]] = {f.name: [] for f in schema}
        for n, i in enumerate(idx):
            cols[f"input_{input_name}"].append(inputs[i].reshape(-1).tolist())
            cols["prediction"].append(None)
            cols["confidence"].append(None)
            cols["label"].append(labels[i])
            cols["label_source"].append(None if labels[i] is None else "feedback")
            cols["device_id"].append(f"dev-{cohort}")
            cols["hardware_profile"].append(profiles[i])
            cols["model_name"].append(model_name)
            cols["version"].append(version)
            cols["time"].append(t0 + timedelta(seconds=n))
            cols["received_at"].append(t0 + timedelta(seconds=n))
            cols["stream"].append("uniform")
            cols["reason"].append(None)
            cols["sample_sha256"].append(hashlib.sha256(f"{i}".encode()).hexdigest())
            cols["row"].append(0)
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pydict(cols, schema=schema), path)
        parts.append((rel, path.read_bytes(), len(idx), cohort))
    digest = hashlib.sha256()
    for rel, data, rows, cohort in sorted(parts):
        digest.update(data)
        files.append(
            {
                "path": rel,
                "release_id": release_id,
                "cohort": cohort,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "rows": rows,
            }
        )
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "created_at": t0.isoformat(),
        "model_name": model_name,
        "trigger": "manual",
        "files": files,
        "digest": {"algorithm": "sha256", "value": digest.hexdigest()},
        "inputs": {input_name: {"dtype": str(dtype), "row_shape": list(inputs.shape[1:])}},
        "counts": {"rows": len(labels)},
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    return manifest
