"""Start-up repair: resolve whatever the previous process left half done.

After :func:`repair` the state file and the disk agree: an interrupted deployment is resumed at its
step (or rolled back after too many boots in trial), slot folders the state does not vouch for
and stale downloads are gone, and the active slot's files match its verified manifest (a damaged
active slot is dropped in favour of an intact other slot, if any).
"""

from __future__ import annotations

import logging
from pathlib import Path

from device_agent.fsutil import remove_tree
from device_agent.store import SHADOW_SLOT, SLOT_NAMES, AgentState, SlotInfo, StateStore
from device_agent.update import machine
from device_agent.update.executor import Executor
from edgeota_contract.bundle import sha256_file
from edgeota_contract.logs import log_event

log = logging.getLogger("device_agent.repair")


def slot_intact(folder: Path, info: SlotInfo | None) -> bool:
    """Whether ``folder`` holds exactly the files of ``info``'s manifest, with their sizes and sha256."""
    if info is None:
        return False
    for entry in info.manifest.files:
        path = folder / entry.name
        if not path.is_file() or path.stat().st_size != entry.size or sha256_file(path) != entry.sha256:
            return False
    return True


def repair(store: StateStore, executor: Executor, max_boot_attempts: int) -> AgentState:
    """Bring state and disk back in line; returns the repaired state."""
    state = store.state
    if state.deployment is not None:
        transition = machine.on_boot(state.deployment, max_boot_attempts)
        executor.commit_transition(transition)
        log_event(
            log,
            "deployment_resumed",
            deployment=state.deployment.deployment_id,
            step=transition.deployment.step.value,
            boot_attempts=transition.deployment.boot_attempts,
        )
    state = store.state
    for slot in (*SLOT_NAMES, SHADOW_SLOT):  # folders of slots the state file does not vouch for are leftovers
        if state.slots.get(slot) is None:
            remove_tree(executor.slot_dir(slot))
    keep = {executor.bundle_path(state.deployment).name} if state.deployment else set()
    keep |= {f"{sha}.bundle" for sha in executor.kept_archives()}  # for a rollback without a download
    if executor.download_dir.exists():
        for path in executor.download_dir.iterdir():
            if path.name not in keep and path.with_suffix(".bundle").name not in keep:
                path.unlink(missing_ok=True)
    active = state.active_slot
    if active is not None and not slot_intact(executor.slot_dir(active), state.slots.get(active)):
        log_event(log, "active_slot_damaged", level=logging.ERROR, slot=active)
        other = SLOT_NAMES[1] if active == SLOT_NAMES[0] else SLOT_NAMES[0]
        with store.update() as st:
            st.slots[active] = None
            st.active_slot = other if slot_intact(executor.slot_dir(other), st.slots.get(other)) else None
        remove_tree(executor.slot_dir(active))
    return store.state


def give_back_boot_attempt(store: StateStore) -> None:
    """A clean shutdown during a trial is not a crash: the next start must not count it as one."""
    dep = store.state.deployment
    if dep is not None and dep.step == machine.Step.TRIAL and dep.boot_attempts > 0:
        with store.update() as st:
            st.deployment = dep.model_copy(update={"boot_attempts": dep.boot_attempts - 1})
