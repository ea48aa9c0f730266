"""Evaluating a candidate release against the serving release on exported field data, and its blessing.

:mod:`edgeota.evaluation.blessing` (pure: thresholds, paired slice counts, :func:`decide`),
:mod:`edgeota.evaluation.record` (the record the CLI uploads and the server re-checks),
:mod:`edgeota.evaluation.dataset` (reading a verified export), :mod:`edgeota.evaluation.runner`
(ONNX Runtime over both releases' verified bundles) and :mod:`edgeota.evaluation.cli` (``edgeota evaluate``).
Nothing here imports FastAPI or SQLAlchemy. See docs/evaluation.md.
"""
