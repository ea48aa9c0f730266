"""State and reason-code names. These strings are part of the wire contract: never rename one."""

from __future__ import annotations

from enum import StrEnum


class RolloutState(StrEnum):
    """Lifecycle of a rollout: draft -> scheduled -> running <-> paused -> terminal."""

    DRAFT = "draft"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in _ROLLOUT_TERMINAL


_ROLLOUT_TERMINAL = frozenset({RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.ROLLED_BACK})


class DeploymentState(StrEnum):
    """Lifecycle of one release on one device, as reported by the device.

    ``pending`` and ``notified`` are the server's own; the device reports the rest.
    ``failed`` and ``rolled_back`` may follow any non-terminal state and carry a reason code.
    """

    PENDING = "pending"
    NOTIFIED = "notified"
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    TRIAL = "trial"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in _DEPLOYMENT_TERMINAL

    @property
    def rank(self) -> int:
        """Position on the happy path; used to ignore late, out-of-order reports."""
        return _DEPLOYMENT_ORDER.index(self)


_DEPLOYMENT_ORDER = [
    DeploymentState.PENDING,
    DeploymentState.NOTIFIED,
    DeploymentState.DOWNLOADING,
    DeploymentState.DOWNLOADED,
    DeploymentState.VERIFYING,
    DeploymentState.INSTALLING,
    DeploymentState.TRIAL,
    DeploymentState.COMMITTED,
    DeploymentState.FAILED,
    DeploymentState.ROLLED_BACK,
]
_DEPLOYMENT_TERMINAL = frozenset({DeploymentState.COMMITTED, DeploymentState.FAILED, DeploymentState.ROLLED_BACK})


def deployment_transition_allowed(current: DeploymentState, new: DeploymentState) -> bool:
    """Whether a report moving ``current`` to ``new`` is progress (True) or stale (False).

    Forward moves along the happy path are allowed, skipping steps included (a device may
    report only some steps). ``failed``/``rolled_back`` are allowed from any non-terminal
    state, and ``rolled_back`` also after ``committed`` (a device may undo a committed model
    whose health window fails later, or the server may order a rollback). Terminal states
    are otherwise final, so duplicate and out-of-order reports are ignored.
    """
    if current == new:
        return False
    if new == DeploymentState.ROLLED_BACK:
        return current != DeploymentState.ROLLED_BACK and current != DeploymentState.FAILED
    if current.terminal:
        return False
    if new == DeploymentState.FAILED:
        return True
    return new.rank > current.rank


class ReasonCode(StrEnum):
    """Why something happened. Reported by devices, stored by the server, shown by the CLI."""

    OK = "ok"
    # signatures and manifests
    SIGNATURE_INVALID = "signature_invalid"
    SIGNATURE_MISSING = "signature_missing"
    UNKNOWN_KEY = "unknown_key"
    MANIFEST_INVALID = "manifest_invalid"
    BUNDLE_INVALID = "bundle_invalid"
    DIGEST_MISMATCH = "digest_mismatch"
    SIZE_MISMATCH = "size_mismatch"
    UNSAFE_ARCHIVE = "unsafe_archive"
    WRONG_PROFILE = "wrong_profile"
    # assignments / commands
    ASSIGNMENT_INVALID = "assignment_invalid"
    WRONG_DEVICE = "wrong_device"
    ASSIGNMENT_EXPIRED = "assignment_expired"
    ASSIGNMENT_REPLAYED = "assignment_replayed"
    RELEASE_COUNTER_ROLLBACK = "release_counter_rollback"
    MALFORMED_MESSAGE = "malformed_message"
    # download and disk
    DOWNLOAD_FAILED = "download_failed"
    DOWNLOAD_TOO_LARGE = "download_too_large"
    DOWNLOAD_TIMEOUT = "download_timeout"
    DISK_FULL = "disk_full"
    # TUF repository metadata (checked before a bundle is downloaded)
    REPOSITORY_METADATA_INVALID = "repository_metadata_invalid"
    REPOSITORY_METADATA_EXPIRED = "repository_metadata_expired"
    REPOSITORY_UNREACHABLE = "repository_unreachable"
    NOT_IN_REPOSITORY = "not_in_repository"
    # install and health
    LOAD_FAILED = "load_failed"
    IO_SIGNATURE_MISMATCH = "io_signature_mismatch"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    NAN_OUTPUT = "nan_output"
    LATENCY_OVER_BUDGET = "latency_over_budget"
    ERROR_RATE = "error_rate"
    CRASH_LOOP = "crash_loop"
    HEALTH_FAILED = "health_failed"
    INTERRUPTED = "interrupted"
    # server side
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"
    DEVICE_TIMEOUT = "device_timeout"
    NO_BUNDLE_FOR_PROFILE = "no_bundle_for_profile"
    GATE_FAILED = "gate_failed"
    SERVER_ROLLBACK = "server_rollback"
    MANUAL = "manual"
    INTERNAL_ERROR = "internal_error"
