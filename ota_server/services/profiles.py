"""Which hardware profiles this server knows, so a device is never provisioned for a class nothing targets.

A device's profile decides which bundle of a release it receives; a profile no bundle will ever carry (a typo
such as ``rpi-4``) would leave the device outside every rollout, silently. The server knows a profile when

1. it is listed in the ``hardware_profiles`` setting (a fleet provisioned before its first release), or
2. a profile file ``<id>.yaml`` / ``<id>.yml`` is in ``hardware_profiles_dir`` (default: the ``hardware_profiles/``
   folder shipped beside the server, when it is there), or
3. a stored release has a bundle for it (a custom profile packaged with ``--profiles-dir`` and published).
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ota_server.core.config import Settings
from ota_server.errors import InvalidRequest
from ota_server.models import Bundle

SHIPPED_PROFILES_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"
"""The profile folder of a source checkout or editable install (absent from a wheel install)."""
PROFILE_SUFFIXES = (".yaml", ".yml")
MAX_NAMED = 20
"""Known profiles named in a refusal, at most (the message stays one line)."""


def profiles_dir(settings: Settings) -> Path | None:
    """The folder whose profile files the server knows, or None when there is none."""
    folder = settings.hardware_profiles_dir or SHIPPED_PROFILES_DIR
    return folder if folder.is_dir() else None


def folder_profiles(folder: Path | None) -> set[str]:
    """Profile ids (file stems) of the YAML files in ``folder``; an unreadable folder counts as empty."""
    if folder is None:
        return set()
    try:
        return {p.stem for p in folder.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file()}
    except OSError:
        return set()


def known_profiles(settings: Settings, session: Session) -> set[str]:
    """Every profile id the server knows (see the module docstring), from settings, disk and database."""
    stored = set(session.scalars(select(Bundle.hardware_profile).distinct()))
    return set(settings.hardware_profiles) | folder_profiles(profiles_dir(settings)) | stored


def require_known_profile(settings: Settings, session: Session, profile: str) -> None:
    """Return when the server knows ``profile``.

    Raises:
        InvalidRequest: it does not; the message names the known profiles (up to :data:`MAX_NAMED`) and how to
            add one.
    """
    known = known_profiles(settings, session)
    if profile in known:
        return
    names = sorted(known)
    listed = ", ".join(names[:MAX_NAMED]) + (f" (+{len(names) - MAX_NAMED} more)" if len(names) > MAX_NAMED else "")
    raise InvalidRequest(
        f"unknown hardware profile {profile!r} (known: {listed or 'none'}); publish a release for it, or add it "
        "to the server's hardware_profiles setting or a profile file to its hardware_profiles_dir"
    )
