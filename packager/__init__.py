"""edgeota packager: per-hardware-profile optimisation passes, gates, and signed bundles.

Entry points: :func:`packager.api.package_model` over one :class:`packager.request.PackageRequest`
(Python), ``edgeota package`` / ``edgeota profiles`` / ``edgeota bundle`` (:mod:`packager.cli`).
Profiles live in ``hardware_profiles/`` (:mod:`packager.profiles`), recipes in :mod:`packager.recipes`,
passes in :mod:`packager.passes` (which know nothing of profiles; :mod:`packager.pipeline` turns a
profile and a recipe into passes), the ladder in :mod:`packager.ladder` and its gates in
:mod:`packager.gates`, bundles in :mod:`packager.bundling` and :mod:`packager.stats`. See
docs/packager.md. Importing this package imports nothing heavy; ONNX input never imports torch
(only :mod:`packager.torch_input` does).
"""
