"""Reading an exported dataset (``edgeota dataset export``) for an evaluation, after checking its digest.

:func:`load_labelled` verifies the folder against ``_manifest.json`` (exactly the listed Parquet files, each
with its sha256, and the content digest over them in the listed order), then reads the rows of the selected
hardware profiles and keeps the labelled ones: a row without a label is skipped and counted
(``unlabelled``), a labelled row without one of its inputs is skipped and counted (``unusable``). Inputs come
back as arrays of ``[rows, *row_shape]`` (the row shape the manifest records per input).

Imports pyarrow and numpy only (no server, no HTTP). Every refusal is an
:class:`~edgeota.evaluation.blessing.EvaluationError` naming the folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeota.evaluation.blessing import EvaluationError

DATASET_FORMAT = "edgeota-dataset/1"
MANIFEST_NAME = "_manifest.json"


@dataclass
class ProfileRows:
    """The labelled, usable rows of one hardware profile."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray
    cohorts: list[str | None]


@dataclass
class LabelledDataset:
    """What an evaluation reads from an export: its manifest facts and the labelled rows per profile."""

    digest: str
    model_name: str
    manifest: dict[str, Any]
    profiles: dict[str, ProfileRows]
    rows: int = 0
    unlabelled: int = 0
    unusable: int = 0
    label_sources: Counter[str] = field(default_factory=Counter)
    rows_per_profile: dict[str, int] = field(default_factory=dict)


def verify_export(folder: Path) -> dict[str, Any]:
    """Check ``folder`` against its ``_manifest.json``; returns the manifest.

    Raises:
        EvaluationError: no folder or manifest, another format, a missing, extra or changed file, or a
            content digest that does not match.
    """
    if not folder.is_dir():
        raise EvaluationError(f"dataset {folder} is not a folder")
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"dataset {folder}: no readable {MANIFEST_NAME}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
        raise EvaluationError(f"dataset {folder}: {MANIFEST_NAME} is not an {DATASET_FORMAT} manifest")
    try:
        files = [(str(f["path"]), str(f["sha256"])) for f in manifest["files"]]
        expected = str(manifest["digest"]["value"])
    except (KeyError, TypeError) as exc:
        raise EvaluationError(f"dataset {folder}: {MANIFEST_NAME} lacks {exc}") from exc
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet"))
    if sorted(p for p, _ in files) != present:
        raise EvaluationError(f"dataset {folder}: the Parquet files differ from the manifest's list")
    total = hashlib.sha256()
    for rel, sha in files:
        data = (folder / rel).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise EvaluationError(f"dataset {folder}: {rel} does not match its sha256 in the manifest")
        total.update(data)
    if total.hexdigest() != expected:
        raise EvaluationError(f"dataset {folder}: content digest does not match the manifest")
    return manifest


def _row_shapes(folder: Path, manifest: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for name, spec in (manifest.get("inputs") or {}).items():
        shape = spec.get("row_shape") if isinstance(spec, dict) else None
        if shape is None:
            raise EvaluationError(f"dataset {folder}: input {name!r} has rows of several shapes; cannot evaluate")
        shapes[str(name)] = tuple(int(d) for d in shape)
    if not shapes:
        raise EvaluationError(f"dataset {folder}: the manifest lists no inputs")
    return shapes


def load_labelled(folder: Path, profiles: set[str] | None = None) -> LabelledDataset:
    """Verify ``folder`` (:func:`verify_export`) and read its labelled rows, per hardware profile.

    ``profiles`` keeps only those profiles' rows (None: every profile in the data).

    Raises:
        EvaluationError: as :func:`verify_export`, a manifest without fixed row shapes, a file that is not
            Parquet, or an input whose rows have another size than the manifest says.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = verify_export(folder)
    shapes = _row_shapes(folder, manifest)
    out = LabelledDataset(
        digest=str(manifest["digest"]["value"]),
        model_name=str(manifest.get("model_name", "")),
        manifest=manifest,
        profiles={},
    )
    parts: dict[str, list[tuple[Any, str | None]]] = {}
    for entry in manifest["files"]:
        try:
            table = pq.read_table(folder / entry["path"])
        except (OSError, pa.ArrowException) as exc:
            raise EvaluationError(f"dataset {folder}: {entry['path']} cannot be read: {exc}") from exc
        missing = [
            c for c in ("label", "hardware_profile", *(f"input_{n}" for n in shapes)) if c not in table.schema.names
        ]
        if missing:
            raise EvaluationError(f"dataset {folder}: {entry['path']} lacks columns {missing}")
        for profile in sorted(set(table.column("hardware_profile").to_pylist())):
            if profiles is not None and profile not in profiles:
                continue
            rows = table.filter(pc.equal(table.column("hardware_profile"), profile))
            parts.setdefault(profile, []).append((rows, entry.get("cohort")))
    for profile, tables in sorted(parts.items()):
        inputs: dict[str, list[np.ndarray]] = {n: [] for n in shapes}
        labels: list[np.ndarray] = []
        cohorts: list[str | None] = []
        for rows, cohort in tables:
            out.rows += rows.num_rows
            out.rows_per_profile[profile] = out.rows_per_profile.get(profile, 0) + rows.num_rows
            labelled = rows.filter(pc.is_valid(rows.column("label")))
            out.unlabelled += rows.num_rows - labelled.num_rows
            usable_mask = None
            for name in shapes:
                valid = pc.is_valid(labelled.column(f"input_{name}"))
                usable_mask = valid if usable_mask is None else pc.and_(usable_mask, valid)
            usable = labelled.filter(usable_mask) if usable_mask is not None else labelled
            out.unusable += labelled.num_rows - usable.num_rows
            if "label_source" in usable.schema.names:
                out.label_sources.update(
                    str(s) if s is not None else "unknown" for s in usable.column("label_source").to_pylist()
                )
            for name, shape in shapes.items():
                inputs[name].append(_input_rows(folder, usable.column(f"input_{name}"), name, shape))
            labels.append(usable.column("label").to_numpy(zero_copy_only=False).astype(np.int64))
            cohorts.extend([cohort] * usable.num_rows)
        out.profiles[profile] = ProfileRows(
            inputs={n: np.concatenate(v) for n, v in inputs.items()}, labels=np.concatenate(labels), cohorts=cohorts
        )
    return out


def _input_rows(folder: Path, column: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A list column (one flattened input per row) as ``[rows, *shape]``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    size = math.prod(shape)
    combined = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(combined) == 0:
        return np.zeros((0, *shape), dtype=np.float32)
    lengths = pc.list_value_length(combined).to_numpy(zero_copy_only=False)
    if not bool((lengths == size).all()):
        raise EvaluationError(f"dataset {folder}: input {name!r} has rows of another size than {list(shape)}")
    flat = combined.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat).reshape(len(combined), *shape)
