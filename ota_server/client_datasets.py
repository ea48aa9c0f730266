"""Checking a dataset export on the client side (:meth:`ota_server.client.ApiClient.export_dataset`).

:func:`export_into` fills the destination folder with a whole, verified export or leaves it as it was;
:func:`extract_dataset` unpacks the export's tar (the export layout only, no links, no other paths);
:func:`verify_dataset` checks a folder against its ``_manifest.json``. Both raise
:class:`~ota_server.client_errors.ApiClientError`. Imports no FastAPI and no SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from ota_server.api.responses_telemetry import DatasetManifest
from ota_server.client_errors import ApiClientError


def export_into(out: Path, download: Callable[[Path], None]) -> DatasetManifest:
    """Fill ``out`` (a folder that does not exist yet, or is empty) with a verified export; returns its manifest.

    ``download`` writes the export's tar to the path it is given, in a work folder beside ``out``; the
    archive is unpacked and verified there first, so ``out`` holds a whole, verified export or nothing.

    Raises:
        ApiClientError: ``out`` not empty, ``download`` failed, or an archive that is not a verified dataset.
    """
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ApiClientError(f"{out} exists and is not an empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        archive = work / "export.tar"
        download(archive)
        folder = work / "dataset"
        extract_dataset(archive, folder)
        manifest = verify_dataset(folder)
        if out.exists():
            out.rmdir()
        os.replace(folder, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest


_DATASET_MEMBER = re.compile(r"^(_manifest\.json|release=[^/]+/cohort=[^/]+/part-[0-9]+\.parquet)$")


def extract_dataset(archive: Path, folder: Path) -> None:
    """Unpack an export's tar into ``folder``: regular files named by the export layout only (no links, no
    other paths). Raises ApiClientError for anything else."""
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                if not member.isfile() or not _DATASET_MEMBER.match(member.name) or ".." in member.name.split("/"):
                    raise ApiClientError(f"dataset archive holds an unexpected member {member.name!r}")
                data = tar.extractfile(member)
                assert data is not None  # a regular file
                dest = folder / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "xb") as fh:
                    shutil.copyfileobj(data, fh)
    except (tarfile.TarError, OSError) as exc:
        raise ApiClientError(f"dataset archive cannot be read: {exc}") from exc


def verify_dataset(folder: Path) -> DatasetManifest:
    """Check an export folder against its ``_manifest.json``: exactly the listed files, each with its sha256, and
    ``digest.value`` = sha256 over the files' bytes concatenated in the listed order. Returns the manifest.

    Raises:
        ApiClientError: a missing, extra or changed file, or a manifest that cannot be read.
    """
    try:
        manifest = DatasetManifest.model_validate_json((folder / "_manifest.json").read_bytes())
    except (OSError, ValidationError) as exc:
        raise ApiClientError(f"{folder}: no readable _manifest.json: {exc}") from exc
    listed = [f.path for f in manifest.files]
    present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet"))
    if sorted(listed) != present:
        raise ApiClientError(f"{folder}: files differ from the manifest ({present} vs {sorted(listed)})")
    total = hashlib.sha256()
    for entry in manifest.files:
        data = (folder / entry.path).read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise ApiClientError(f"{folder}: {entry.path} does not match its sha256")
        total.update(data)
    if total.hexdigest() != manifest.digest.get("value"):
        raise ApiClientError(f"{folder}: content digest does not match the manifest")
    return manifest
