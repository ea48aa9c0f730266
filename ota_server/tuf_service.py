"""Wiring the TUF repository (:mod:`ota_server.tuf_repo`) into the server: settings, start-up, re-signing."""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

from edgeota_contract.logs import log_event
from ota_server.tuf_repo import TufPolicy, TufRepository, bundle_custom

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from ota_server.core.config import Settings

log = logging.getLogger("edgeota.server.tuf")


def open_repository(settings: Settings) -> TufRepository | None:
    """The server's repository as configured (None when ``tuf_enabled`` is false); nothing is created."""
    if not settings.tuf_enabled:
        return None
    policy = TufPolicy(
        timestamp_expiry=timedelta(seconds=settings.tuf_timestamp_expiry_seconds),
        snapshot_expiry=timedelta(seconds=settings.tuf_snapshot_expiry_seconds),
        targets_expiry=timedelta(seconds=settings.tuf_targets_expiry_seconds),
        root_expiry=timedelta(seconds=settings.tuf_root_expiry_seconds),
    )
    return TufRepository(settings.resolved_tuf_dir, policy)


def prepare_repository(repo: TufRepository, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """At start-up (core process): create the repository on first start, make every stored bundle a target
    (bundles accepted before TUF was enabled, or an upload that died between commit and hook), re-sign due roles.

    Raises:
        TufRepositoryError: the repository or its keys are unusable.
    """
    if not repo.is_initialized():
        written = repo.initialize(root_keys=settings.tuf_root_keys, threshold=settings.tuf_root_threshold)
        log_event(log, "tuf_repository_created", root_keys=[str(p) for p in written])
    from sqlalchemy import select

    from ota_server.models import Bundle

    with sessions() as session:
        rows = session.execute(
            select(
                Bundle.sha256,
                Bundle.size,
                Bundle.model_name,
                Bundle.version,
                Bundle.hardware_profile,
                Bundle.release_counter,
            )
        ).all()
    added = repo.add_bundles((r[0], r[1], bundle_custom(r[2], r[3], r[4], r[5])) for r in rows)
    if added:
        log_event(log, "tuf_targets_synced", added=added)
    repo.refresh()


class TufRefresher:
    """A daemon thread in the core process that re-signs due online roles every ``interval`` seconds."""

    def __init__(self, repo: TufRepository, interval: float) -> None:
        self.repo = repo
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuf-refresh", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                roles = self.repo.refresh()
                if roles:
                    log_event(log, "tuf_metadata_resigned", roles=roles)
            except Exception as exc:  # a bad key file must not kill the thread: devices will report expiry
                log_event(log, "tuf_refresh_failed", logging.ERROR, detail=str(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
