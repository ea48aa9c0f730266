"""Releases for the demo and the fleet benchmark: good ones through the packager, a bad one on purpose.

- :func:`package_release` trains nothing: it packages a trained model for several hardware profiles
  with :func:`packager.api.package_model` (every gate applies) and returns one bundle per profile.
- :func:`make_bad_release` builds the release a fleet must refuse: each profile's good bundle with
  its model replaced by :func:`packager.examples.digits.make_degraded_variant` (``slow`` by default:
  same outputs, far slower), re-signed with the release key. The packager's latency gate would
  refuse such a model, so it is signed here directly, standing in for a release whose gate was
  misconfigured: it is the devices' trial window and the rollout's gate that must catch it.

Errors: :class:`ReleaseBuildError` when a profile fails packaging; packager errors pass through.
"""

from __future__ import annotations

import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgeota_contract.bundle import bundle_file_name, create_bundle, read_manifest
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import MODEL_FILE, PassRecord, release_counter_from_version
from edgeota_contract.signing import SigningKey


class ReleaseBuildError(EdgeotaError):
    """A release could not be built for every requested profile."""


@dataclass(frozen=True)
class BuiltRelease:
    version: str
    bundles: dict[str, Path]  # hardware profile -> bundle file
    recipes: dict[str, str]  # hardware profile -> chosen recipe (or the degradation)


def package_release(
    model_path: Path,
    calibration: Path,
    eval_data: Path,
    profiles: Sequence[str],
    key: SigningKey,
    out_dir: Path,
    name: str,
    version: str,
    jobs: int = 1,
) -> BuiltRelease:
    """Package ``model_path`` for ``profiles`` with every packager gate on.

    Raises:
        ReleaseBuildError: some profile found no passing recipe (the message names it and why).
    """
    from packager.api import package_model
    from packager.evaluate import LatencySettings
    from packager.request import PackageRequest

    stdout = sys.stdout  # quantisation swaps sys.stdout; with jobs > 1 threads could leave it swapped
    try:
        report = package_model(
            PackageRequest(
                model=model_path,
                profiles=list(profiles),
                calibration=calibration,
                eval_data=eval_data,
                key=key,
                out_dir=out_dir,
                name=name,
                version=version,
                jobs=jobs,
                latency=LatencySettings(warmup=5, rounds=3, runs_per_round=20),
                measure_memory=False,
            )
        )
    finally:
        sys.stdout = stdout
    raw: Any = report.results
    results: list[Any] = list(raw.values()) if isinstance(raw, dict) else list(raw)  # by profile, or a list
    failed = [r for r in results if not r.ok or r.bundle_path is None]
    if failed:
        raise ReleaseBuildError(f"{name} {version}: profile {failed[0].profile} failed packaging: {failed[0].error}")
    return BuiltRelease(
        version=version,
        bundles={r.profile: Path(r.bundle_path) for r in results},
        recipes={r.profile: r.recipe or "?" for r in results},
    )


def make_bad_release(
    good: BuiltRelease,
    key: SigningKey,
    out_dir: Path,
    version: str,
    kind: Literal["slow", "wrong", "nan"] = "slow",
    slow_matmuls: int = 640,
) -> BuiltRelease:
    """Derive a deliberately bad release from ``good``: same files, degraded model, new version, re-signed."""
    from packager.examples.digits import make_degraded_variant

    out_dir.mkdir(parents=True, exist_ok=True)
    bundles: dict[str, Path] = {}
    for profile, path in good.bundles.items():
        manifest, _ = read_manifest(path)
        with tarfile.open(path, mode="r:") as tar:
            payload = {
                m.name: _member(tar, m) for m in tar.getmembers() if m.name not in ("manifest.json", "manifest.sig")
            }
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src, dst = Path(tmp) / "good.onnx", Path(tmp) / "bad.onnx"
            src.write_bytes(payload[MODEL_FILE])
            make_degraded_variant(src, dst, kind=kind, slow_matmuls=slow_matmuls)
            payload[MODEL_FILE] = dst.read_bytes()
        payload["model_card.md"] = (
            f"# {manifest.model_name} {version} ({profile})\n\nDeliberately bad release for the edgeota demo: "
            f"the {good.version} model with a '{kind}' degradation. Not for use.\n"
        ).encode()
        fields = manifest.model_dump(exclude={"files", "signing_key_id", "schema_version"})
        fields.update(
            version=version,
            release_counter=release_counter_from_version(version),
            recipe=f"{manifest.recipe}+degraded-{kind}",
            passes=[*manifest.passes, PassRecord(name="degrade", config={"kind": kind})],
        )
        target = out_dir / bundle_file_name(manifest.model_name, version, profile)
        create_bundle(target, payload, key, **fields)
        bundles[profile] = target
    return BuiltRelease(version=version, bundles=bundles, recipes={p: f"degraded-{kind}" for p in bundles})


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise ReleaseBuildError(f"bundle member {member.name} is not a regular file")
    return handle.read()
