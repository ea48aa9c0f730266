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
from collections.abc import Callable
from typing import Any

from device_agent.fsutil import FreeSpaceProbe, disk_free
from device_agent.serving.runtime import ModelRuntime, SessionCache
from device_agent.settings import AgentConfig
from device_agent.store import AgentState, FinishedDeployment, StateStore
from device_agent.update import machine
from device_agent.update.machine import Deployment, Report, Step
from device_agent.update.steps import CrashHook, Interrupted, Steps
from device_agent.update.trial import TrialMonitor
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.logs import log_event
from edgeota_contract.messages import Assignment
from edgeota_contract.states import DeploymentState, ReasonCode

__all__ = ["CrashHook", "Executor", "Interrupted", "StatusFactory", "sigkill_hook"]

log = logging.getLogger("device_agent.update")

StatusFactory = Callable[[Assignment, Report], dict[str, Any]]


def sigkill_hook(crash_at: str | None) -> CrashHook:
    """A hook that kills this process with SIGKILL (a real ``kill -9``) at the named point."""

    def hook(point: str) -> None:
        if crash_at is not None and point == crash_at:
            log_event(log, "crash_injected", level=logging.WARNING, point=point)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class Executor(Steps):
    """Drives update steps for one agent (the steps themselves: :class:`~device_agent.update.steps.Steps`).
    Not thread-safe: one worker thread drives it."""

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
        self.on_shadow = None
        self.on_reports: Callable[[], None] | None = None
        self.download_dir = self.settings.state_dir / "download"
        self._candidate = None
        self._baseline_ms = None
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
                if nxt.outcome == DeploymentState.COMMITTED and a.mode != "shadow":
                    st.remember_committed(a.bundle_sha256)
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
        if transition.reports and self.on_reports is not None:
            self.on_reports()  # send at once: a long step (download, trial) must not hide progress until the end
        for report in transition.reports:
            log_event(
                log,
                "deployment_status",
                deployment=a.deployment_id,
                state=report.state.value,
                reason=report.reason.value,
                detail=report.detail,
            )
