"""Which bundle archives the agent keeps in its download folder, and the check a kept one passes before reuse.

A server-ordered rollback goes back to the release the device ran before. Keeping that release's archive
(and the archive of the bundle just committed, which the next update turns into "the one before") lets
such a rollback skip the download, as an A/B system switches back without fetching anything: a fleet halt
then costs the server no bundle traffic. The folder holds at most two kept archives beside the download of
the deployment in progress, so the disk cost is bounded by two bundle archives.

A kept archive is trusted no more than a downloaded one: it is hashed again and compared with the
assignment's sha256 and size before use (a file changed on disk is removed and downloaded again), and then
goes through the same verification as a fresh download.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from device_agent.store import SLOT_NAMES, AgentState
from edgeota_contract.bundle import sha256_file

KEPT = 2
"""Archives kept at most: the bundle committed last and the one it replaced."""


def archive_name(bundle_sha256: str) -> str:
    """The file name of an archive in the download folder (a download in progress ends in ``.part``)."""
    return f"{bundle_sha256}.bundle"


def archives_to_keep(state: AgentState, committing: str | None = None) -> tuple[str, ...]:
    """The sha256 of the archives to keep, oldest first, at most :data:`KEPT`: the last bundles committed on
    this device (``committing``, a bundle whose commit is being stored, counts as the latest), so the bundle
    now serving and the one a rollback would go back to. State written before ``committed_bundles`` existed
    falls back to the bundles in the A/B slots, which outside a deployment only ever hold committed bundles.
    """
    history: list[str] = []
    if state.deployment is None:
        history += [info.bundle_sha256 for slot, info in state.slots.items() if slot in SLOT_NAMES and info]
    history += state.committed_bundles
    if committing is not None:
        history.append(committing)
    latest_first: list[str] = []
    for sha in reversed(history):
        if sha not in latest_first:
            latest_first.append(sha)
    return tuple(reversed(latest_first[:KEPT]))


def prune(folder: Path, keep: Iterable[str]) -> list[str]:
    """Remove every file in ``folder`` except the archives of ``keep`` (sha256) and their ``.part`` files;
    returns the names removed. A missing folder holds nothing to remove."""
    allowed = {archive_name(sha) for sha in keep}
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if path.name in allowed or path.with_suffix(".bundle").name in allowed:
            continue
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def matches(path: Path, bundle_sha256: str, size: int) -> tuple[bool, str]:
    """Whether the file at ``path`` has exactly ``size`` bytes hashing to ``bundle_sha256``, and the sha256 it
    was found to have ("" when the size already differs, so a wrong file is not read). Raises OSError when the
    file cannot be read."""
    if path.stat().st_size != size:
        return False, ""
    found = sha256_file(path)
    return found == bundle_sha256, found
