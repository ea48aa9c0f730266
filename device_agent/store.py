"""The agent's persistent state: slots, committed release counters, the deployment in progress,
finished deployments, used nonces and the unacknowledged status reports.

Everything lives in one small JSON file (``state.json``) that is only ever replaced atomically
(:func:`device_agent.fsutil.atomic_write`), so a slot switch, the step of the update machine
and the status report it produced are made durable together or not at all.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from device_agent.fsutil import atomic_write
from device_agent.update.machine import Deployment
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import BundleManifest
from edgeota_contract.states import DeploymentState, ReasonCode

STATE_FILE = "state.json"
SLOT_NAMES = ("a", "b")
SHADOW_SLOT = "shadow"
MAX_FINISHED = 200
MAX_NONCES = 1000
MAX_COMMITTED = 32


class StateError(EdgeotaError):
    """The state file is unreadable; the agent refuses to guess."""


class SlotInfo(BaseModel):
    """A slot holding a complete bundle that passed :func:`verify_bundle` when it was unpacked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: BundleManifest
    bundle_sha256: str

    @property
    def model_name(self) -> str:
        return self.manifest.model_name

    @property
    def version(self) -> str:
        return self.manifest.version


class FinishedDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment_id: str
    assignment_id: str
    state: DeploymentState
    reason: ReasonCode
    detail: str = ""
    model_name: str
    version: str
    bundle_sha256: str


class AgentState(BaseModel):
    """The whole persisted state. Mutated only inside :meth:`StateStore.update`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    active_slot: str | None = None
    slots: dict[str, SlotInfo | None] = Field(default_factory=lambda: dict.fromkeys(SLOT_NAMES))
    committed_counters: dict[str, int] = Field(default_factory=dict)
    committed_bundles: list[str] = Field(
        default_factory=list, description="sha256 of bundles committed on this device (latest last): known good"
    )
    deployment: Deployment | None = None
    shadow_deployment: str | None = Field(default=None, description="deployment of the shadowed candidate")
    shadow_sample_rate: float = 1.0
    pending_command: str | None = Field(default=None, description="a queued signed assignment payload")
    finished: list[FinishedDeployment] = Field(default_factory=list)
    used_nonces: list[str] = Field(default_factory=list)
    outbox: list[dict[str, Any]] = Field(default_factory=list, description="unacked StatusReport JSON")
    outbox_dropped: int = 0

    def active(self) -> SlotInfo | None:
        return self.slots.get(self.active_slot) if self.active_slot else None

    def inactive_slot(self) -> str:
        return SLOT_NAMES[1] if self.active_slot == SLOT_NAMES[0] else SLOT_NAMES[0]

    def finished_by_id(self, deployment_id: str) -> FinishedDeployment | None:
        for item in self.finished:
            if item.deployment_id == deployment_id:
                return item
        return None

    def remember_committed(self, bundle_sha256: str) -> None:
        """Record a bundle this device committed (served through its trial, or already ran)."""
        self.committed_bundles = [b for b in self.committed_bundles if b != bundle_sha256]
        self.committed_bundles.append(bundle_sha256)
        del self.committed_bundles[:-MAX_COMMITTED]

    def known_good(self, bundle_sha256: str) -> bool:
        """Whether this device committed ``bundle_sha256`` before: it is in :attr:`committed_bundles`, or it
        is what an A/B slot holds outside a deployment (only ever a bundle once committed, as failed
        deployments clear their slot; this also covers state written before ``committed_bundles`` existed)."""
        if bundle_sha256 in self.committed_bundles:
            return True
        return self.deployment is None and any(
            info is not None and info.bundle_sha256 == bundle_sha256
            for slot, info in self.slots.items()
            if slot in SLOT_NAMES
        )

    def remember_nonce(self, nonce: str) -> None:
        if nonce not in self.used_nonces:
            self.used_nonces.append(nonce)
            del self.used_nonces[:-MAX_NONCES]

    def record_finished(self, item: FinishedDeployment) -> None:
        self.finished = [f for f in self.finished if f.deployment_id != item.deployment_id]
        self.finished.append(item)
        del self.finished[:-MAX_FINISHED]

    def add_report(self, report: dict[str, Any], limit: int) -> None:
        self.outbox.append(report)
        if len(self.outbox) > limit:
            self.outbox_dropped += len(self.outbox) - limit
            del self.outbox[: len(self.outbox) - limit]

    @property
    def last_deployment(self) -> FinishedDeployment | None:
        return self.finished[-1] if self.finished else None


class StateStore:
    """Thread-safe owner of ``state.json`` in one state folder.

    Copy on write: :meth:`update` hands out a deep copy under a lock, writes it atomically when the
    block ends without an exception and then publishes it as the new snapshot. :attr:`state` returns
    the current snapshot itself, without copying: snapshots are never changed after they are
    published, so readers (the idle agent reads the state on every tick) pay nothing, and callers
    must treat what they read as read-only.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / STATE_FILE
        self._lock = threading.RLock()
        self._state = self._load()
        self._written: bytes | None = None  # the bytes of the last write: an unchanged state is not rewritten

    def _load(self) -> AgentState:
        if not self.path.exists():
            return AgentState()
        try:
            return AgentState.model_validate_json(self.path.read_bytes())
        except (OSError, ValidationError) as exc:
            raise StateError(f"cannot read agent state {self.path}: {exc}", ReasonCode.INTERNAL_ERROR) from exc

    @property
    def state(self) -> AgentState:
        """The current snapshot (shared, read-only by convention; replaced, never changed, by :meth:`update`)."""
        return self._state

    @contextmanager
    def update(self) -> Iterator[AgentState]:
        """Mutate a copy of the state; it is saved (durably: write, fsync, rename, fsync the folder) and
        published only if the block succeeds. A block that changed nothing writes nothing."""
        with self._lock:
            draft = self._state.model_copy(deep=True)
            yield draft
            data = json.dumps(draft.model_dump(mode="json"), separators=(",", ":")).encode("utf-8")
            if data == self._written:
                return
            self.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data)
            self._written = data
            self._state = draft


def read_state(state_dir: Path) -> AgentState:
    """Read the state of a (possibly running) agent without taking its lock. Raises StateError."""
    return StateStore(state_dir).state
