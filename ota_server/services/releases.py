"""Accepting signed bundles into releases, and reading releases back."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgeota_contract.bundle import verify_bundle
from edgeota_contract.signing import TrustedKeys
from ota_server.artifacts import ArtifactStore
from ota_server.errors import Conflict
from ota_server.models import Bundle, Release
from ota_server.services import audit
from ota_server.tuf_repo import TufRepository, bundle_custom


def accept_bundle(
    session: Session,
    store: ArtifactStore,
    trusted: TrustedKeys,
    upload: Path,
    actor: str,
    tuf: TufRepository | None = None,
) -> tuple[Bundle, bool]:
    """Verify ``upload`` and file it into its release; returns (bundle, created).

    The temporary ``upload`` file is always consumed (moved into the store or deleted). With ``tuf``, the
    bundle becomes a TUF target before this returns (a target whose commit then fails is harmless: devices
    are only ever assigned committed bundles).

    Raises:
        SignatureError / BundleError: the bundle is unsigned, untrusted, tampered or unsafe.
        Conflict: another bundle already holds this model version and profile, or no release keys are configured.
    """
    try:
        if len(trusted) == 0:
            raise Conflict("no trusted release keys configured; set EDGEOTA_SERVER_RELEASE_KEYS")
        verified = verify_bundle(upload, trusted)
        m = verified.manifest
        existing = session.get(Bundle, verified.archive_sha256)
        if existing is not None:
            return existing, False
        release = session.scalar(
            select(Release).where(Release.model_name == m.model_name, Release.version == m.version)
        )
        if release is None:
            release = Release(id=uuid.uuid4().hex, model_name=m.model_name, version=m.version, created_by=actor)
            session.add(release)
            session.flush()
            audit.record(
                session,
                actor,
                "release.create",
                "release",
                release.id,
                None,
                {"model_name": m.model_name, "version": m.version},
            )
        clash = session.scalar(
            select(Bundle).where(Bundle.release_id == release.id, Bundle.hardware_profile == m.hardware_profile)
        )
        if clash is not None:
            raise Conflict(
                f"{m.model_name} {m.version} already has a different bundle for profile {m.hardware_profile}",
            )
        bundle = Bundle(
            sha256=verified.archive_sha256,
            release_id=release.id,
            model_name=m.model_name,
            version=m.version,
            hardware_profile=m.hardware_profile,
            release_counter=m.release_counter,
            size=verified.archive_size,
            signing_key_id=verified.signing_key_id,
            manifest=m.model_dump(mode="json"),
        )
        session.add(bundle)
        audit.record(
            session,
            actor,
            "bundle.accept",
            "bundle",
            bundle.sha256,
            None,
            {"release_id": release.id, "hardware_profile": m.hardware_profile, "size": bundle.size},
        )
        session.flush()
        store.put_file(verified.archive_sha256, upload)
        if tuf is not None:
            tuf.add_bundle(
                bundle.sha256,
                bundle.size,
                bundle_custom(m.model_name, m.version, m.hardware_profile, m.release_counter),
            )
        return bundle, True
    finally:
        upload.unlink(missing_ok=True)


def bundle_json(bundle: Bundle) -> dict[str, Any]:
    return {
        "release_id": bundle.release_id,
        "model_name": bundle.model_name,
        "version": bundle.version,
        "hardware_profile": bundle.hardware_profile,
        "release_counter": bundle.release_counter,
        "bundle_sha256": bundle.sha256,
        "bundle_size": bundle.size,
    }


def release_json(session: Session, release: Release) -> dict[str, Any]:
    bundles = list(
        session.scalars(select(Bundle).where(Bundle.release_id == release.id).order_by(Bundle.hardware_profile))
    )
    return {
        "release_id": release.id,
        "model_name": release.model_name,
        "version": release.version,
        "created_at": release.created_at.isoformat(),
        "created_by": release.created_by,
        "bundles": [
            {
                **bundle_json(b),
                "signing_key_id": b.signing_key_id,
                "metrics": b.manifest.get("metrics", {}),
                "lineage": b.manifest.get("lineage", {}),
                "recipe": b.manifest.get("recipe"),
            }
            for b in bundles
        ],
        "metrics": {b.hardware_profile: b.manifest.get("metrics", {}) for b in bundles},
        "lineage": bundles[0].manifest.get("lineage", {}) if bundles else {},
    }
