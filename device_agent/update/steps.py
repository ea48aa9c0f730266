"""The update steps themselves, against the real disk, network and ONNX Runtime.

:class:`Steps` holds one method per named step of :mod:`device_agent.update.machine`; each does its
work and returns the change it makes to the persisted state (or None), which the
:class:`~device_agent.update.executor.Executor` stores atomically together with the next step and
the status reports. Every step is idempotent: after a crash it simply runs again.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from device_agent.fsutil import FreeSpaceProbe, fsync_dir, remove_tree
from device_agent.serving.runtime import LoadedModel, ModelError, ModelRuntime, SessionCache, load_model
from device_agent.settings import AgentConfig, AgentSettings
from device_agent.store import SHADOW_SLOT, AgentState, SlotInfo, StateStore
from device_agent.transport.http import resolve_url
from device_agent.update import archives
from device_agent.update.checks import policy_problem, quantile
from device_agent.update.checks import smoke_test as run_smoke_test
from device_agent.update.download import DownloadPolicy, download
from device_agent.update.machine import Deployment
from device_agent.update.trial import TrialMonitor, latencies_on, trial_settings
from device_agent.update.tuf_client import verify_in_repository
from edgeota_contract.bundle import verify_bundle
from edgeota_contract.errors import AssignmentError, BundleError, EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment
from edgeota_contract.states import ReasonCode

log = logging.getLogger("device_agent.update")

CrashHook = Callable[[str], None]


class Interrupted(Exception):
    """The agent is shutting down in the middle of a step; the step resumes on the next start."""


class Steps:
    """The step implementations; :class:`~device_agent.update.executor.Executor` drives them."""

    config: AgentConfig
    settings: AgentSettings
    store: StateStore
    runtime: ModelRuntime
    cache: SessionCache
    crash_hook: CrashHook
    free_space: FreeSpaceProbe
    stop: threading.Event
    rng: random.Random
    defer_update: Callable[[Assignment], bool] | None
    on_shadow: Callable[[LoadedModel | None, float], None] | None
    download_dir: Path
    trial: TrialMonitor
    _candidate: LoadedModel | None
    _baseline_ms: float | None

    def slot_dir(self, slot: str) -> Path:
        return self.settings.state_dir / "slots" / slot

    def bundle_path(self, dep: Deployment) -> Path:
        return self.download_dir / f"{dep.assignment.bundle_sha256}.bundle"

    # ------------------------------------------------------------------ steps

    def _verify_assignment(self, dep: Deployment) -> None:
        problem = policy_problem(dep.assignment, self.store.state, self.config.hardware_profile)
        if problem is not None:
            raise AssignmentError(problem.detail, problem.reason)
        verify_in_repository(self.config, dep.assignment, self._sleep)  # TUF: fresh metadata vouches for the bundle
        return None

    def _check_disk(self, dep: Deployment) -> None:
        self.download_dir.mkdir(parents=True, exist_ok=True)
        size = dep.assignment.bundle_size
        have = 0
        for path in (self.bundle_path(dep), self.bundle_path(dep).with_suffix(".part")):
            if path.exists():
                have = path.stat().st_size
        need = (size - have) + size + self.settings.disk_margin_bytes
        free = self.free_space(self.settings.state_dir)
        if free < need and archives.prune(self.download_dir, [dep.assignment.bundle_sha256]):
            log_event(log, "kept_archives_dropped", level=logging.WARNING, deployment=dep.deployment_id, need=need)
            free = self.free_space(self.settings.state_dir)  # an update matters more than a download-free rollback
        if free < need:
            raise EdgeotaError(f"needs {need} bytes free, {free} available", ReasonCode.DISK_FULL)
        return None

    def _download(self, dep: Deployment) -> None:
        """Bring the assigned archive to ``download/<sha256>.bundle``; when this step succeeds, that file's
        sha256 and size were found equal to the assignment's. A file already there (an archive kept from an
        earlier deployment, or this deployment's own after a crash) is hashed again first and reused only on a
        match (event ``bundle_reused``, no request to the server); otherwise it is removed (event
        ``kept_archive_mismatch``) and downloaded again. A download is hashed as it is written and gets its
        final name only when its sha256 matches. Raises DownloadError (and its reasons) on a failed download."""
        a = dep.assignment
        final = self.bundle_path(dep)
        if final.exists() and self._reuse(dep, final):
            return None
        part = final.with_suffix(".part")
        url, same_origin = resolve_url(self.config.provisioning.server.url, a.bundle_url)
        s = self.settings
        policy = DownloadPolicy(
            timeout_seconds=s.download_timeout_seconds,
            stall_seconds=s.download_stall_seconds,
            retries=s.download_retries,
            backoff_seconds=s.download_backoff_seconds,
            backoff_max_seconds=s.download_backoff_max_seconds,
            rate_limit_bps=s.download_rate_limit_bps,
        )
        half = a.bundle_size // 2
        crossed = [part.exists() and part.stat().st_size >= half]

        def progress(have: int) -> None:
            if self.stop.is_set():
                raise Interrupted()
            if not crossed[0] and have >= half:
                crossed[0] = True
                self.crash_hook("download_mid")

        token = self.config.provisioning.server.token if same_origin else None
        download(
            url,
            part,
            a.bundle_size,
            token=token,
            policy=policy,
            rng=self.rng,
            sleep=self._sleep,
            on_progress=progress,
            allow_insecure_http=s.allow_insecure_http,
            expected_sha256=a.bundle_sha256,  # a part with other bytes is removed, never renamed
        )
        os.replace(part, final)
        fsync_dir(final.parent)
        return None

    def _reuse(self, dep: Deployment, final: Path) -> bool:
        a = dep.assignment
        ok, found = archives.matches(final, a.bundle_sha256, a.bundle_size)
        if ok:
            log_event(log, "bundle_reused", deployment=dep.deployment_id, sha256=a.bundle_sha256, size=a.bundle_size)
            return True
        log_event(
            log,
            "kept_archive_mismatch",
            level=logging.WARNING,
            deployment=dep.deployment_id,
            sha256=a.bundle_sha256,
            found_sha256=found,
            size=a.bundle_size,
            found_size=final.stat().st_size,
        )
        final.unlink(missing_ok=True)
        return False

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _check_digest(self, dep: Deployment) -> None:
        """The archive is the one the server signed for, before anything parses it (a crafted archive from a
        compromised mirror, or a kept archive changed on disk, never reaches the archive reader):
        :meth:`_download` found its sha256 equal to the assignment's ``bundle_sha256``, hashing a download as
        it was written (so a fresh download is never read an extra time) and a file already there (a kept
        archive) once more before reusing it; here its size is checked again. :meth:`_verify_bundle` hashes
        it while unpacking, so a change after this point is caught too."""
        path = self.bundle_path(dep)
        if path.stat().st_size != dep.assignment.bundle_size:
            path.unlink(missing_ok=True)
            raise BundleError("downloaded archive does not have the assigned size", ReasonCode.SIZE_MISMATCH)
        return None

    def _digest_mismatch(self, dep: Deployment) -> BundleError:
        self.bundle_path(dep).unlink(missing_ok=True)  # the next attempt downloads it again
        return BundleError("downloaded archive does not match the assigned sha256", ReasonCode.DIGEST_MISMATCH)

    def _verify_bundle(self, dep: Deployment) -> Callable[[AgentState], None]:
        a, target = dep.assignment, dep.target_slot
        with self.store.update() as st:  # forget the slot before touching its files
            if st.active_slot == target:
                raise EdgeotaError("refusing to stage into the active slot", ReasonCode.INTERNAL_ERROR)
            st.slots[target] = None
        folder = self.slot_dir(target)
        remove_tree(folder)
        state = self.store.state
        minimum = state.committed_counters.get(a.model_name) if a.mode == "install" else None
        path = self.bundle_path(dep)
        try:
            verified = verify_bundle(
                path,
                self.config.release_keys,
                expected_profile=self.config.hardware_profile,
                min_release_counter=minimum,
                extract_to=folder,
            )
        except EdgeotaError as exc:
            remove_tree(folder)
            cause = exc.__cause__
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:  # not the bundle's fault: say so
                raise EdgeotaError(f"disk full while unpacking into slot {target}", ReasonCode.DISK_FULL) from exc
            raise
        if verified.archive_sha256 != a.bundle_sha256:  # the file changed since check_digest hashed it
            remove_tree(folder)
            raise self._digest_mismatch(dep)
        m = verified.manifest
        if (m.model_name, m.version, m.release_counter) != (a.model_name, a.version, a.release_counter):
            remove_tree(folder)
            raise BundleError(
                f"bundle is {m.model_name} {m.version} (counter {m.release_counter}), the assignment names "
                f"{a.model_name} {a.version} (counter {a.release_counter})",
                ReasonCode.MANIFEST_INVALID,
            )
        fsync_dir(folder)
        info = SlotInfo(manifest=m, bundle_sha256=verified.archive_sha256)

        def mutate(st: AgentState) -> None:
            st.slots[target] = info

        return mutate

    def load_slot(self, slot: str) -> LoadedModel:
        info = self.store.state.slots.get(slot)
        if info is None:
            raise ModelError(f"slot {slot} holds no verified bundle", ReasonCode.LOAD_FAILED)
        return load_model(self.slot_dir(slot), info.manifest, info.bundle_sha256, slot, self.cache)

    def _smoke_test(self, dep: Deployment) -> None:
        candidate = self.load_slot(dep.target_slot)
        run_smoke_test(candidate)
        self._candidate = candidate
        self._baseline_ms = None
        current = self.runtime.current
        if current is not None and current.input_names == candidate.input_names:
            try:  # the old model keeps serving; measure it on the same vectors for the trial's comparison
                self._baseline_ms = quantile(latencies_on(current, candidate, runs=5), 0.5)
            except ModelError:
                self._baseline_ms = None
        return None

    def _switch(self, dep: Deployment) -> Callable[[AgentState], None]:
        target = dep.target_slot
        if dep.assignment.mode == "shadow":
            rate = dep.assignment.shadow_sample_rate

            def start_shadow(st: AgentState) -> None:
                st.shadow_deployment = dep.deployment_id
                st.shadow_sample_rate = rate

            return start_shadow
        self._wait_for_consent(dep)

        def mutate(st: AgentState) -> None:
            if st.slots.get(target) is None:
                raise EdgeotaError("target slot is not verified", ReasonCode.INTERNAL_ERROR)
            st.active_slot = target

        return mutate

    def _wait_for_consent(self, dep: Deployment) -> None:
        """Let the application defer the switch while it is busy, for at most ``max_update_deferral_seconds``
        in total, counted by the wall clock from the first deferral, which is persisted: a restart (or a
        crash) while deferring resumes the same budget rather than starting a new one."""
        if self.defer_update is None:
            return
        limit = self.settings.max_update_deferral_seconds
        since = dep.deferred_since
        while True:
            waited = 0.0 if since is None else max(0.0, (datetime.now(UTC) - since).total_seconds())
            if waited >= limit:
                log_event(log, "update_deferral_exhausted", deployment=dep.deployment_id, seconds=limit)
                return
            try:
                busy = self.defer_update(dep.assignment)
            except Exception:  # a failing callback must not block updates forever
                log.exception("update deferral callback failed")
                return
            if not busy:
                return
            if since is None:
                since = datetime.now(UTC)
                self._remember_deferral(dep, since)
            log_event(log, "update_deferred", deployment=dep.deployment_id)
            self._sleep(min(self.settings.deferral_poll_seconds, max(0.0, limit - waited)))

    def _remember_deferral(self, dep: Deployment, since: datetime) -> None:
        with self.store.update() as st:
            if st.deployment is not None and st.deployment.deployment_id == dep.deployment_id:
                st.deployment = st.deployment.model_copy(update={"deferred_since": since})

    def _ensure_serving(self, slot: str) -> LoadedModel:
        current = self.runtime.current
        if current is not None and current.slot == slot:
            return current
        model = self._candidate if self._candidate is not None and self._candidate.slot == slot else None
        if model is None:
            model = self.load_slot(slot)
        self.runtime.install(model)
        log_event(log, "model_installed", slot=slot, model=model.manifest.model_name, version=model.manifest.version)
        return model

    def _run_trial(self, dep: Deployment) -> None:
        info = self.store.state.slots.get(dep.target_slot)
        if info is not None:
            self.trial.watch(info.bundle_sha256)  # before the swap: the very first requests count
        model = self._ensure_serving(dep.target_slot)
        self.trial.run(model, trial_settings(self.settings, dep.known_good), self._baseline_ms, self._sleep)

    def _cleanup_download(self, dep: Deployment, committing: str | None = None) -> None:
        """Leave in the download folder only the archives :func:`~device_agent.update.archives.archives_to_keep`
        names (none with ``keep_bundle_archives`` off): the deployment ends here, so its own ``.part`` and
        archive go unless they are kept. ``committing``: the bundle whose commit this step stores."""
        keep = archives.archives_to_keep(self.store.state, committing) if self.settings.keep_bundle_archives else ()
        removed = archives.prune(self.download_dir, keep)
        if removed:
            log_event(log, "downloads_pruned", deployment=dep.deployment_id, removed=len(removed), kept=len(keep))

    def kept_archives(self) -> tuple[str, ...]:
        """The archives (sha256) the download folder keeps in the current state (start-up repair spares them)."""
        return archives.archives_to_keep(self.store.state) if self.settings.keep_bundle_archives else ()

    def _commit(self, dep: Deployment) -> Callable[[AgentState], None]:
        a = dep.assignment
        self._cleanup_download(dep, None if a.mode == "shadow" else a.bundle_sha256)
        if a.mode == "shadow":
            candidate = self._candidate if self._candidate is not None else self.load_slot(dep.target_slot)
            self._candidate = None
            if self.on_shadow is not None:
                self.on_shadow(candidate, a.shadow_sample_rate)
            return lambda st: None

        def mutate(st: AgentState) -> None:
            old = st.committed_counters.get(a.model_name, 0)
            st.committed_counters[a.model_name] = (
                a.release_counter if a.mode == "rollback" else max(old, a.release_counter)
            )

        self._candidate = None
        return mutate

    def _abort(self, dep: Deployment) -> Callable[[AgentState], None]:
        self._cleanup_download(dep)
        self._candidate = None
        target = dep.target_slot
        state = self.store.state
        if state.active_slot != target:
            with self.store.update() as st:
                st.slots[target] = None
                if target == SHADOW_SLOT:
                    st.shadow_deployment = None
            remove_tree(self.slot_dir(target))
            if target == SHADOW_SLOT and self.on_shadow is not None:
                self.on_shadow(None, 1.0)
        return lambda st: None

    def stop_shadow(self) -> None:
        """End shadowing (``shadow_stop``): forget the candidate and remove its slot."""
        with self.store.update() as st:
            st.shadow_deployment = None
            st.slots[SHADOW_SLOT] = None
        remove_tree(self.slot_dir(SHADOW_SLOT))
        if self.on_shadow is not None:
            self.on_shadow(None, 1.0)

    def _rollback(self, dep: Deployment) -> Callable[[AgentState], None]:
        self._cleanup_download(dep)
        self._candidate = None
        if dep.target_slot == SHADOW_SLOT:
            self.stop_shadow()
            return lambda st: None
        previous, target = dep.previous_slot, dep.target_slot
        state = self.store.state
        if previous is not None and state.slots.get(previous) is None:
            previous = None  # nothing verified to go back to
        with self.store.update() as st:
            st.active_slot = previous
            st.slots[target] = None
        model = None
        if previous is not None:
            try:
                model = self.load_slot(previous)
            except ModelError as exc:
                log_event(log, "rollback_load_failed", level=logging.ERROR, slot=previous, detail=str(exc))
        self.runtime.install(model)
        remove_tree(self.slot_dir(target))
        self.cache.discard(dep.assignment.bundle_sha256)
        return lambda st: None
