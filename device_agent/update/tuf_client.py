"""Check an assignment against the server's TUF repository (python-tuf ngclient) before downloading.

An added layer beside the two signatures the agent already checks (the server key on the
assignment, a release key on the bundle's manifest): the assigned bundle must be a target of the
server's TUF repository, with the assignment's length and sha256, in metadata that is fresh
(``repository_metadata_expired``), not rolled back, consistent (no mix-and-match) and signed by a
threshold of the currently trusted keys (``repository_metadata_invalid``), following root rotations
and key revocations as python-tuf's client workflow does.

The trust anchor is the root in the provisioning (``[trust] tuf_root``); the metadata cache lives in
``<state_dir>/tuf`` (ngclient keeps root history, timestamp and snapshot there, which is what makes
rollback detectable across restarts). A device provisioned before TUF existed has no root: the check
is skipped and that is logged once per process. Metadata is fetched with the agent's one HTTP client
(:class:`~device_agent.update.tuf_fetcher.AgentFetcher`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment
from edgeota_contract.provisioning import tuf_metadata_url, tuf_target_path
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    from device_agent.settings import AgentConfig

log = logging.getLogger("device_agent.update.tuf")
_skip_logged: set[str] = set()
_CUSTOM_FIELDS = ("model_name", "version", "hardware_profile", "release_counter")


class RepositoryCheckError(EdgeotaError):
    """The assignment's bundle is not vouched for by fresh, valid TUF metadata."""

    default_reason = ReasonCode.REPOSITORY_METADATA_INVALID


def check_target(
    assignment: Assignment,
    *,
    trusted_root: bytes,
    metadata_url: str,
    metadata_dir: Path,
    retries: int = 2,
    backoff_seconds: float = 1.0,
    timeout_seconds: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Refresh the TUF metadata and require ``assignment``'s bundle to be a matching target.

    Transient faults (connection refused, HTTP errors, timeouts) are retried ``retries`` times with
    doubling delays from ``backoff_seconds``; verification failures are final at once.

    Raises:
        RepositoryCheckError: ``repository_metadata_expired`` (freshness), ``repository_metadata_invalid``
            (bad or missing signatures, threshold not met, rollback, mix-and-match, oversized metadata),
            ``not_in_repository`` (no such target, or its length, sha256 or recorded model, version,
            profile or release counter differ from the assignment), ``repository_unreachable``
            (metadata could not be fetched after all retries).
    """
    from tuf.api import exceptions as tuf_errors
    from tuf.ngclient.config import UpdaterConfig
    from tuf.ngclient.updater import Updater

    from device_agent.update.tuf_fetcher import AgentFetcher

    path = tuf_target_path(assignment.bundle_sha256)
    metadata_dir.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(backoff_seconds * 2 ** (attempt - 1))
        try:
            updater = Updater(
                str(metadata_dir),
                metadata_url,
                fetcher=AgentFetcher(timeout_seconds),
                config=UpdaterConfig(app_user_agent="edgeota-agent"),
                bootstrap=trusted_root,
            )
            info = updater.get_targetinfo(path)
            break
        except tuf_errors.ExpiredMetadataError as exc:
            raise RepositoryCheckError(f"TUF metadata expired: {exc}", ReasonCode.REPOSITORY_METADATA_EXPIRED) from exc
        except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError, ValueError) as exc:
            # ValueError: metadata that does not even parse (ngclient raises RepositoryError for most of it).
            raise RepositoryCheckError(
                f"TUF metadata rejected: {type(exc).__name__}: {exc}", ReasonCode.REPOSITORY_METADATA_INVALID
            ) from exc
        except Exception as exc:  # DownloadError, urllib3 connection errors, OSError: worth another try
            last = exc
            log_event(log, "tuf_refresh_retry", level=logging.WARNING, attempt=attempt, detail=str(exc))
    else:
        raise RepositoryCheckError(
            f"cannot fetch TUF metadata from {metadata_url}: {type(last).__name__}: {last}",
            ReasonCode.REPOSITORY_UNREACHABLE,
        )
    if info is None:
        raise RepositoryCheckError(
            f"bundle {assignment.bundle_sha256} is not a target of the server's TUF repository",
            ReasonCode.NOT_IN_REPOSITORY,
        )
    if info.length != assignment.bundle_size or info.hashes.get("sha256") != assignment.bundle_sha256:
        raise RepositoryCheckError(
            f"TUF target {path} has length {info.length} and hashes {info.hashes}, the assignment says "
            f"{assignment.bundle_size} bytes, sha256 {assignment.bundle_sha256}",
            ReasonCode.NOT_IN_REPOSITORY,
        )
    custom = info.custom if isinstance(info.custom, dict) else {}
    for name in _CUSTOM_FIELDS:
        if name in custom and custom[name] != getattr(assignment, name):
            raise RepositoryCheckError(
                f"TUF target {path} records {name}={custom[name]!r}, the assignment says {getattr(assignment, name)!r}",
                ReasonCode.NOT_IN_REPOSITORY,
            )


def verify_in_repository(config: AgentConfig, assignment: Assignment, sleep: Callable[[float], None]) -> None:
    """The update step's hook: :func:`check_target` with this agent's root, server URL and state folder.

    A device without a provisioned TUF root keeps working as before (logged once per process).

    Raises:
        RepositoryCheckError: see :func:`check_target`.
    """
    root = config.provisioning.trust.tuf_root
    if root is None:
        if config.device_id not in _skip_logged:
            _skip_logged.add(config.device_id)
            log_event(log, "tuf_check_skipped", level=logging.WARNING, reason="no tuf_root in provisioning")
        return
    s = config.settings
    check_target(
        assignment,
        trusted_root=root.encode("utf-8"),
        metadata_url=tuf_metadata_url(config.provisioning.server.url),
        metadata_dir=s.state_dir / "tuf",
        retries=s.download_retries,
        backoff_seconds=s.download_backoff_seconds,
        timeout_seconds=s.download_stall_seconds,
        sleep=sleep,
    )
