"""Retrain the digits example model on a dataset export plus the original training data.

The loop's last step before packaging: ``edgeota dataset export`` writes what devices sampled (Parquet,
partitioned by release and cohort, labels where feedback came back); this reads it back with pyarrow,
keeps the labelled rows (optionally of one cohort), adds the digits training split the first model was
trained on, trains the same MLP and writes the three files the packager takes:

- ``digits-mlp.onnx``: the retrained fp32 model;
- ``calibration.npz``: the exported inputs of the cohort the model is for (labelled or not, up to
  :data:`CALIBRATION_ROWS`), so the bundle's reference statistics describe what those devices see now,
  topped up with original training images when the export holds fewer rows;
- ``eval.npz``: held-out labelled exported rows plus the original evaluation split.

``since`` (``--since ISO``) keeps only the rows devices served at or after that time (the export's ``time``
column, the device's clock): an export's window is on arrival, and samples reach the server some seconds
after they were taken, so rows from before a fault can arrive after it.

Run: ``python -m packager.examples.retrain_digits --export DIR --out DIR [--cohort NAME] [--since ISO]``. Errors
(no export, no labelled rows, an input column that is not 64 values per row, a bad ``--since``) end with a
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from packager.examples.digits import INPUT_NAME, _build_mlp, _split

CALIBRATION_ROWS = 200
HELD_OUT_SHARE = 0.25
INPUT_COLUMN = f"input_{INPUT_NAME}"


class RetrainError(Exception):
    """The export cannot be used to retrain (missing, unlabelled, wrong shape)."""


@dataclass(frozen=True)
class RetrainResult:
    model_path: Path
    calibration_path: Path
    eval_path: Path
    exported_rows: int
    labelled_rows: int
    original_rows: int
    accuracy_on_exported: float | None
    """Accuracy of the retrained model on the held-out labelled exported rows (None when there are none)."""
    accuracy_on_original: float


@dataclass(frozen=True)
class ExportedRows:
    inputs: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    """-1 where the row has no label."""


def read_export(export_dir: Path, cohort: str | None = None, since: datetime | None = None) -> ExportedRows:
    """Rows of an ``edgeota dataset export`` folder (one cohort when given; served at or after ``since``, an
    aware datetime, when given). Raises RetrainError."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    if not (export_dir / "_manifest.json").is_file():
        raise RetrainError(f"{export_dir} is not a dataset export (no _manifest.json)")
    dataset = ds.dataset(str(export_dir), format="parquet", partitioning="hive")
    if INPUT_COLUMN not in dataset.schema.names:
        raise RetrainError(f"the export has no {INPUT_COLUMN} column (columns: {', '.join(dataset.schema.names)})")
    flt = (ds.field("cohort") == cohort) if cohort is not None else None
    if since is not None:
        if since.tzinfo is None:
            raise RetrainError("since needs a time zone (e.g. 2026-12-07T09:15:00+00:00)")
        served = ds.field("time") >= pa.scalar(since, type=dataset.schema.field("time").type)
        flt = served if flt is None else flt & served
    table = dataset.to_table(columns=[INPUT_COLUMN, "label"], filter=flt)
    if table.num_rows == 0:
        where = (f" for cohort {cohort}" if cohort else "") + (f" served since {since.isoformat()}" if since else "")
        raise RetrainError(f"the export holds no rows{where}")
    rows = table.column(INPUT_COLUMN).to_pylist()
    if any(r is None or len(r) != 64 for r in rows):
        raise RetrainError(f"every {INPUT_COLUMN} row must hold 64 values (8x8 digits images)")
    labels = np.array([-1 if v is None else int(v) for v in table.column("label").to_pylist()], dtype=np.int64)
    return ExportedRows(np.asarray(rows, dtype=np.float32), labels)


def retrain_from_export(
    export_dir: Path,
    out_dir: Path,
    *,
    cohort: str | None = None,
    seed: int = 0,
    epochs: int = 300,
    since: datetime | None = None,
) -> RetrainResult:
    """Train on the export's labelled rows (of ``cohort``, served since ``since``) plus the original split; write
    the packager's three files."""
    exported = read_export(Path(export_dir), cohort, since)
    labelled = np.flatnonzero(exported.labels >= 0)
    if labelled.size == 0:
        raise RetrainError("no exported row has a label yet (report feedback labels before retraining)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(labelled)
    n_held = int(len(order) * HELD_OUT_SHARE) if len(order) >= 8 else 0
    held, train = order[:n_held], order[n_held:]
    x_orig, y_orig, x_eval_orig, y_eval_orig = _split(seed)
    x_train = np.concatenate([x_orig, exported.inputs[train]])
    y_train = np.concatenate([y_orig, exported.labels[train]])
    x_eval = np.concatenate([exported.inputs[held], x_eval_orig])
    y_eval = np.concatenate([exported.labels[held], y_eval_orig])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = out_dir / "digits-mlp.onnx"
    logits = _build_mlp(x_train, y_train, x_eval, model_path, seed, epochs)
    predicted = logits.argmax(axis=1)
    on_exported = float((predicted[:n_held] == y_eval[:n_held]).mean()) if n_held else None
    on_original = float((predicted[n_held:] == y_eval[n_held:]).mean())

    calibration = exported.inputs[rng.permutation(len(exported.inputs))[:CALIBRATION_ROWS]]
    if len(calibration) < CALIBRATION_ROWS:
        top_up = x_orig[rng.choice(len(x_orig), CALIBRATION_ROWS - len(calibration), replace=False)]
        calibration = np.concatenate([calibration, top_up])
    calibration_path = out_dir / "calibration.npz"
    eval_path = out_dir / "eval.npz"
    arrays: dict[str, Any] = {INPUT_NAME: calibration.astype(np.float32)}
    np.savez(calibration_path, **arrays)
    arrays = {INPUT_NAME: x_eval.astype(np.float32), "labels": y_eval}
    np.savez(eval_path, **arrays)
    return RetrainResult(
        model_path=model_path,
        calibration_path=calibration_path,
        eval_path=eval_path,
        exported_rows=len(exported.inputs),
        labelled_rows=int(labelled.size),
        original_rows=len(x_orig),
        accuracy_on_exported=on_exported,
        accuracy_on_original=on_original,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m packager.examples.retrain_digits",
        description="Retrain the digits example model on a dataset export plus the original training data.",
    )
    parser.add_argument("--export", type=Path, required=True, help="folder written by `edgeota dataset export`")
    parser.add_argument("--out", type=Path, required=True, help="folder for digits-mlp.onnx, calibration.npz, eval.npz")
    parser.add_argument("--cohort", default=None, help="use only this cohort's rows (default: every cohort)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    parser.add_argument("--epochs", type=int, default=300, help="training iterations (default 300)")
    parser.add_argument("--since", default=None, help="only rows served at or after this ISO time (with zone)")
    args = parser.parse_args(argv)
    try:
        since = datetime.fromisoformat(args.since) if args.since else None
    except ValueError:
        print(f"error: --since {args.since!r} is not an ISO time", file=sys.stderr)
        return 2
    try:
        result = retrain_from_export(
            args.export, args.out, cohort=args.cohort, seed=args.seed, epochs=args.epochs, since=since
        )
    except (RetrainError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    summary = {k: str(v) if isinstance(v, Path) else v for k, v in vars(result).items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
