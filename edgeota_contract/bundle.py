"""The bundle archive: writing, verifying and safely unpacking.

A bundle is an uncompressed POSIX tar file whose first member is ``manifest.json``
(canonical JSON), whose second is ``manifest.sig`` (a :class:`DetachedSignature` over the
manifest bytes), followed by exactly the files the manifest lists, sorted by name. Only
regular files with flat names are allowed. Archives are reproducible: members carry fixed
times, owners and modes, so the same content gives the same archive bytes.

Archives are read only by the strict reader of :mod:`edgeota_contract.archive` (never by
``tarfile``), which bounds the time and memory any archive can cost. Verification streams the
archive once and never trusts a byte before its digest is checked; unpacking writes only inside
the destination folder, and on any failure leaves it empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgeota_contract.archive import MAX_MEMBERS, ArchiveReader, write_archive
from edgeota_contract.errors import BundleError, ContractError, SignatureError
from edgeota_contract.manifest import (
    MANIFEST_FILE,
    NAME_PATTERN,
    SEMVER_PATTERN,
    SIGNATURE_FILE,
    BundleManifest,
    FileEntry,
)
from edgeota_contract.signing import DetachedSignature, SigningKey, TrustedKeys, verify_detached
from edgeota_contract.states import ReasonCode

MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096
BUNDLE_SUFFIX = ".bundle.tar"
MAX_PAYLOAD_FILES = MAX_MEMBERS - 2
"""Files a bundle may hold besides manifest.json and manifest.sig (the archive reader's member cap)."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file digest were checked."""

    manifest: BundleManifest
    signing_key_id: str
    archive_sha256: str
    archive_size: int
    extracted_to: Path | None = None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_file_name(model_name: str, version: str, hardware_profile: str) -> str:
    """The file name every producer gives a bundle: ``{model_name}-{version}-{hardware_profile}.bundle.tar``.

    Guarantees one flat file name (no path separator, no leading dot): each part must match the
    manifest's own pattern for it. Raises :class:`ContractError` naming the first part that does not.
    """
    for label, value, pattern in (
        ("model name", model_name, NAME_PATTERN),
        ("version", version, SEMVER_PATTERN),
        ("hardware profile", hardware_profile, NAME_PATTERN),
    ):
        if not re.fullmatch(pattern, value):
            raise ContractError(f"invalid {label} for a bundle file name: {value!r}", ReasonCode.MANIFEST_INVALID)
    return f"{model_name}-{version}-{hardware_profile}{BUNDLE_SUFFIX}"


def create_bundle(
    out_path: str | os.PathLike[str],
    payload: Mapping[str, bytes],
    key: SigningKey,
    **manifest_fields: Any,
) -> BundleManifest:
    """Write a signed bundle holding ``payload`` (file name -> bytes) and return its manifest.

    ``manifest_fields`` are every :class:`BundleManifest` field except ``files`` and
    ``signing_key_id``, which are computed here. The archive is written to a temporary file
    beside ``out_path`` and renamed into place, so a reader never sees half a bundle and a
    failure leaves nothing behind.

    The archive is in the strict format of :mod:`edgeota_contract.archive` (plain ustar headers),
    so every bundle written here passes :func:`verify_bundle`.

    Raises:
        ContractError: the manifest fields or file names break the schema, or there are more than
            :data:`MAX_PAYLOAD_FILES` files.
    """
    files = [
        FileEntry(name=name, size=len(data), sha256=hashlib.sha256(data).hexdigest())
        for name, data in sorted(payload.items())
    ]
    if len(files) > MAX_PAYLOAD_FILES:
        raise ContractError(
            f"a bundle holds at most {MAX_PAYLOAD_FILES} files besides its manifest, not {len(files)}",
            ReasonCode.MANIFEST_INVALID,
        )
    try:
        manifest = BundleManifest(files=files, signing_key_id=key.key_id, **manifest_fields)
    except ValidationError as exc:
        raise ContractError(f"invalid manifest: {exc.errors()[0]['msg']}", ReasonCode.MANIFEST_INVALID) from exc
    manifest_bytes = manifest.canonical_bytes()
    signature = key.sign(manifest_bytes)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as raw:
            sig_bytes = signature.model_dump_json().encode("utf-8")
            members = [(MANIFEST_FILE, manifest_bytes), (SIGNATURE_FILE, sig_bytes)]
            write_archive(raw, members + [(entry.name, payload[entry.name]) for entry in files])
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(bundle_path: str | os.PathLike[str]) -> tuple[BundleManifest, DetachedSignature | None]:
    """Read the manifest and signature of a bundle without verifying anything (for ``inspect``).

    Only the first two members are read, with the strict reader of :mod:`edgeota_contract.archive`,
    so the work is bounded by :data:`MAX_MANIFEST_BYTES` and :data:`MAX_SIGNATURE_BYTES`.

    Raises:
        BundleError: unreadable, corrupt or unsafe archive (``bundle_invalid``, ``unsafe_archive``).
        ContractError: the manifest does not parse (``manifest_invalid``).
    """
    try:
        with open(bundle_path, "rb") as fh:
            reader = ArchiveReader(fh)
            first = reader.next_member()
            if first is None or first.name != MANIFEST_FILE:
                raise BundleError("archive does not start with manifest.json", ReasonCode.BUNDLE_INVALID)
            manifest = BundleManifest.parse(reader.read_data(MAX_MANIFEST_BYTES))
            second = reader.next_member()
            sig = None
            if second is not None and second.name == SIGNATURE_FILE:
                sig = DetachedSignature.model_validate_json(reader.read_data(MAX_SIGNATURE_BYTES))
            return manifest, sig
    except ValidationError as exc:
        raise BundleError(f"not a readable bundle archive: {exc}", ReasonCode.BUNDLE_INVALID) from exc
    except OSError as exc:
        raise BundleError(
            f"cannot read bundle {bundle_path}: {exc.strerror or exc}", ReasonCode.BUNDLE_INVALID
        ) from exc


def verify_bundle(
    bundle_path: str | os.PathLike[str],
    trusted_release_keys: TrustedKeys,
    *,
    expected_profile: str | None = None,
    min_release_counter: int | None = None,
    extract_to: str | os.PathLike[str] | None = None,
) -> VerifiedBundle:
    """Verify a bundle in one streaming pass and optionally unpack it.

    Checks, in this order, before any model byte is trusted: the archive starts with the
    manifest and its signature; the signature is by a trusted release key over the exact
    manifest bytes; the manifest parses; the hardware profile and release counter are as
    required; then every following member is a regular, flat-named file listed in the
    manifest, seen once, with the listed size and sha256; no listed file is missing; and the
    archive ends cleanly. The archive is held to the strict format of :mod:`edgeota_contract.archive`
    (plain ustar, at most :data:`~edgeota_contract.archive.MAX_MEMBERS` members, no links, devices
    or header extensions, each name once), so its time is linear in the archive size and its
    memory bounded, whatever the headers claim.

    When ``extract_to`` is given, files are written there (the folder must be empty or
    absent) and fsynced; on any failure the folder is removed again.

    Raises:
        SignatureError: missing, unknown-key or invalid signature.
        BundleError: corrupt or unsafe archive, wrong profile, digest/size mismatch, downgrade.
    """
    dest = Path(extract_to) if extract_to is not None else None
    if dest is not None:
        if dest.exists() and any(dest.iterdir()):
            raise BundleError(f"extraction folder {dest} is not empty", ReasonCode.BUNDLE_INVALID)
        dest.mkdir(parents=True, exist_ok=True)
    try:
        result = _verify_stream(Path(bundle_path), trusted_release_keys, expected_profile, min_release_counter, dest)
    except BaseException:
        if dest is not None:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return result


def _verify_stream(
    path: Path,
    trusted: TrustedKeys,
    expected_profile: str | None,
    min_release_counter: int | None,
    dest: Path | None,
) -> VerifiedBundle:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed in finally
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}", ReasonCode.BUNDLE_INVALID) from exc
    reader = ArchiveReader(raw)
    try:
        first = reader.next_member()
        if first is None or first.name != MANIFEST_FILE:
            raise BundleError("archive does not start with manifest.json", ReasonCode.BUNDLE_INVALID)
        manifest_bytes = reader.read_data(MAX_MANIFEST_BYTES)
        second = reader.next_member()
        if second is None or second.name != SIGNATURE_FILE:
            raise SignatureError("bundle has no manifest.sig", ReasonCode.SIGNATURE_MISSING)
        try:
            signature = DetachedSignature.model_validate_json(reader.read_data(MAX_SIGNATURE_BYTES))
        except ValidationError as exc:
            raise BundleError("manifest.sig is malformed", ReasonCode.SIGNATURE_INVALID) from exc
        key_id = verify_detached(manifest_bytes, signature, trusted)
        manifest = BundleManifest.parse(manifest_bytes)
        if manifest.signing_key_id != key_id:
            raise BundleError("manifest names another signing key", ReasonCode.MANIFEST_INVALID)
        _check_policy(manifest, expected_profile, min_release_counter)
        expected = {f.name: f for f in manifest.files}
        seen: set[str] = set()
        # The reader refuses repeated names, links, devices and unsafe names itself.
        while (member := reader.next_member()) is not None:
            entry = expected.get(member.name)
            if entry is None:
                raise BundleError(
                    f"archive entry {member.name!r} is not listed in the manifest", ReasonCode.BUNDLE_INVALID
                )
            if member.size != entry.size:
                raise BundleError(
                    f"{member.name} is {member.size} bytes, manifest says {entry.size}", ReasonCode.SIZE_MISMATCH
                )
            _check_member(reader, entry, dest)
            seen.add(member.name)
        missing = sorted(set(expected) - seen)
        if missing:
            raise BundleError(
                f"bundle lacks files named in the manifest: {', '.join(missing)}", ReasonCode.BUNDLE_INVALID
            )
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror or exc}", ReasonCode.BUNDLE_INVALID) from exc
    finally:
        raw.close()
    # next_member() returned None: the end of the archive was checked through to the end of the file.
    return VerifiedBundle(
        manifest=manifest,
        signing_key_id=key_id,
        archive_sha256=reader.sha256,
        archive_size=reader.size,
        extracted_to=dest,
    )


def _check_policy(manifest: BundleManifest, expected_profile: str | None, min_release_counter: int | None) -> None:
    if expected_profile is not None and manifest.hardware_profile != expected_profile:
        raise BundleError(
            f"bundle is for profile {manifest.hardware_profile!r}, this device is {expected_profile!r}",
            ReasonCode.WRONG_PROFILE,
        )
    if min_release_counter is not None and manifest.release_counter < min_release_counter:
        raise BundleError(
            f"release counter {manifest.release_counter} is below the committed {min_release_counter}",
            ReasonCode.RELEASE_COUNTER_ROLLBACK,
        )


def _check_member(reader: ArchiveReader, entry: FileEntry, dest: Path | None) -> None:
    digest = hashlib.sha256()
    out = None
    if dest is not None:
        fd = os.open(dest / entry.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        out = os.fdopen(fd, "wb")
    try:
        for chunk in reader.iter_data():
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not None:
            out.close()
    if digest.hexdigest() != entry.sha256:
        raise BundleError(f"{entry.name} does not match its sha256 in the manifest", ReasonCode.DIGEST_MISMATCH)
