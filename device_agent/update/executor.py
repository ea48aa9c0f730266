"""Runs the update machine's steps against the real disk, network and ONNX Runtime.

Each call to :meth:`Executor.advance` runs the deployment's current step and then, in one atomic
state-file write, stores the step's effect (a slot switch, a commit), the next step and the
status reports to send. A crash anywhere therefore leaves the state at the start of some step,
which the next boot resumes (:func:`device_agent.update.machine.on_boot`).

Before each named step the crash hook is called with the step's name; in tests (and with
``crash_at``) it kills the process with SIGKILL right there.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from device_agent.fsutil import FreeSpaceProbe, disk_free, fsync_dir, remove_tree
from device_agent.runtime import LoadedModel, ModelError, ModelRuntime, SessionCache, load_model
from device_agent.settings import AgentConfig
from device_agent.store import SHADOW_SLOT, AgentState, FinishedDeployment, SlotInfo, StateStore
from device_agent.update import machine
from device_agent.update.checks import (
    policy_problem,
    quantile,
)
from device_agent.update.checks import smoke_test as run_smoke_test
from device_agent.update.download import DownloadPolicy, download, resolve_url
from device_agent.update.machine import Deployment, Report, Step
from device_agent.update.trial import TrialMonitor, latencies_on
from edgeota_contract.bundle import sha256_file, verify_bundle
from edgeota_contract.errors import AssignmentError, BundleError, EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment
from edgeota_contract.states import ReasonCode

log = logging.getLogger("device_agent.update")

CrashHook = Callable[[str], None]
StatusFactory = Callable[[Assignment, Report], dict[str, Any]]


class Interrupted(Exception):
    """The agent is shutting down in the middle of a step; the step resumes on the next start."""


def sigkill_hook(crash_at: str | None) -> CrashHook:
    """A hook that kills this process with SIGKILL (a real ``kill -9``) at the named point."""

    def hook(point: str) -> None:
        if crash_at is not None and point == crash_at:
            log_event(log, "crash_injected", level=logging.WARNING, point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class Executor:
    """Performs update steps for one agent. Not thread-safe: one worker thread drives it."""

    def __init__(
        self,
        config: AgentConfig,
        store: StateStore,
        runtime: ModelRuntime,
        cache: SessionCache,
        make_status: StatusFactory,
        *,
        crash_hook: CrashHook | None = None,
        free_space: FreeSpaceProbe = disk_free,
        stop: threading.Event | None = None,
        rng: random.Random | None = None,
        defer_update: Callable[[Assignment], bool] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.settings
        self.store = store
        self.runtime = runtime
        self.cache = cache
        self.make_status = make_status
        self.crash_hook = crash_hook or sigkill_hook(config.settings.crash_at)
        self.free_space = free_space
        self.stop = stop or threading.Event()
        self.rng = rng or random.Random()
        self.defer_update = defer_update
        self.on_shadow: Callable[[LoadedModel | None, float], None] | None = None
        self.download_dir = self.settings.state_dir / "download"
        self._candidate: LoadedModel | None = None
        self._baseline_ms: float | None = None
        self.trial = TrialMonitor()
        runtime.add_listener(self.trial)
        self._steps: dict[Step, Callable[[Deployment], Callable[[AgentState], None] | None]] = {
            Step.VERIFY_ASSIGNMENT: self._verify_assignment,
            Step.CHECK_DISK: self._check_disk,
            Step.DOWNLOAD: self._download,
            Step.CHECK_DIGEST: self._check_digest,
            Step.VERIFY_BUNDLE: self._verify_bundle,
            Step.SMOKE_TEST: self._smoke_test,
            Step.SWITCH: self._switch,
            Step.TRIAL: self._run_trial,
            Step.COMMIT: self._commit,
            Step.ABORT: self._abort,
            Step.ROLLBACK: self._rollback,
        }

    # ------------------------------------------------------------------ driving

    def slot_dir(self, slot: str) -> Path:
        return self.settings.state_dir / "slots" / slot

    def bundle_path(self, dep: Deployment) -> Path:
        return self.download_dir / f"{dep.assignment.bundle_sha256}.bundle"

    def run_pending(self) -> None:
        """Advance the deployment in progress until it is done or the agent stops. Raises Interrupted."""
        while (dep := self.store.state.deployment) is not None:
            if self.stop.is_set():
                raise Interrupted()
            self.advance(dep)

    def advance(self, dep: Deployment) -> Deployment:
        """Run ``dep``'s current step and persist the outcome; returns the new record."""
        self.crash_hook(dep.step.value)
        log_event(log, "update_step", deployment=dep.deployment_id, step=dep.step.value)
        mutate: Callable[[AgentState], None] | None = None
        try:
            mutate = self._steps[dep.step](dep)
            transition = machine.on_success(dep)
        except Interrupted:
            raise
        except EdgeotaError as exc:
            log_event(
                log,
                "update_step_failed",
                level=logging.WARNING,
                deployment=dep.deployment_id,
                step=dep.step.value,
                reason=exc.reason.value,
                detail=str(exc),
            )
            transition = machine.on_failure(dep, exc.reason, str(exc))
        except OSError as exc:
            reason = ReasonCode.DISK_FULL if exc.errno == 28 else ReasonCode.INTERNAL_ERROR
            transition = machine.on_failure(dep, reason, f"{dep.step.value}: {exc}")
        except Exception as exc:  # a bug must end the deployment, not retry the same step forever
            log.exception("update step crashed")
            transition = machine.on_failure(dep, ReasonCode.INTERNAL_ERROR, f"{dep.step.value}: {exc!r}")
        self.commit_transition(transition, mutate)
        return transition.deployment

    def commit_transition(
        self, transition: machine.Transition, mutate: Callable[[AgentState], None] | None = None
    ) -> None:
        """Store a transition (and a step's state change) atomically, with its reports."""
        nxt = transition.deployment
        a = nxt.assignment
        with self.store.update() as st:
            if mutate is not None:
                mutate(st)
            for report in transition.reports:
                st.add_report(self.make_status(a, report), self.settings.outbox_max_reports)
            if nxt.done:
                st.deployment = None
                assert nxt.outcome is not None
                st.record_finished(
                    FinishedDeployment(
                        deployment_id=a.deployment_id,
                        assignment_id=a.assignment_id,
                        state=nxt.outcome,
                        reason=nxt.reason,
                        detail=nxt.detail,
                        model_name=a.model_name,
                        version=a.version,
                        bundle_sha256=a.bundle_sha256,
                    )
                )
            else:
                st.deployment = nxt
        for report in transition.reports:
            log_event(
                log,
                "deployment_status",
                deployment=a.deployment_id,
                state=report.state.value,
                reason=report.reason.value,
                detail=report.detail,
            )

    # ------------------------------------------------------------------ steps

    def _verify_assignment(self, dep: Deployment) -> None:
        problem = policy_problem(dep.assignment, self.store.state, self.config.hardware_profile)
        if problem is not None:
            raise AssignmentError(problem.detail, problem.reason)
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
        if free < need:
            raise EdgeotaError(f"needs {need} bytes free, {free} available", ReasonCode.DISK_FULL)
        return None

    def _download(self, dep: Deployment) -> None:
        a = dep.assignment
        final = self.bundle_path(dep)
        if final.exists() and final.stat().st_size == a.bundle_size:
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
            url, part, a.bundle_size, token=token, policy=policy, rng=self.rng, sleep=self._sleep, on_progress=progress
        )
        os.replace(part, final)
        fsync_dir(final.parent)
        return None

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _check_digest(self, dep: Deployment) -> None:
        path = self.bundle_path(dep)
        digest = sha256_file(path)
        if digest != dep.assignment.bundle_sha256:
            path.unlink(missing_ok=True)
            raise BundleError("downloaded archive does not match the assigned sha256", ReasonCode.DIGEST_MISMATCH)
        return None

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
        verified = verify_bundle(
            self.bundle_path(dep),
            self.config.release_keys,
            expected_profile=self.config.hardware_profile,
            min_release_counter=minimum,
            extract_to=folder,
        )
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
        """Let the application defer the switch while it is busy, for at most ``max_update_deferral_seconds``."""
        if self.defer_update is None:
            return
        limit = self.settings.max_update_deferral_seconds
        started = time.monotonic()
        while time.monotonic() - started < limit:
            try:
                busy = self.defer_update(dep.assignment)
            except Exception:  # a failing callback must not block updates forever
                log.exception("update deferral callback failed")
                return
            if not busy:
                return
            log_event(log, "update_deferred", deployment=dep.deployment_id)
            self._sleep(min(self.settings.deferral_poll_seconds, max(0.0, limit - (time.monotonic() - started))))
        log_event(log, "update_deferral_exhausted", deployment=dep.deployment_id, seconds=limit)

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
        self.trial.run(model, self.settings, self._baseline_ms, self._sleep)

    def _cleanup_download(self, dep: Deployment) -> None:
        final = self.bundle_path(dep)
        final.unlink(missing_ok=True)
        final.with_suffix(".part").unlink(missing_ok=True)

    def _commit(self, dep: Deployment) -> Callable[[AgentState], None]:
        a = dep.assignment
        self._cleanup_download(dep)
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
