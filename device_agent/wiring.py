"""Parts of the device agent built from its settings, or put back in service at start-up.

:class:`~device_agent.agent.Agent` (the composition root) calls these: :func:`build_recorder` (telemetry windows),
:func:`build_sampler` (the raw-input sampler), :func:`restore_models` (start-up repair, then the active and shadow models served again) and
:func:`open_endpoint` (the local inference endpoint). Nothing here imports numpy, ONNX Runtime or
``http.server`` at module level: an idle agent loads none of them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from device_agent.serving.runtime import LoadedModel, ModelError, ModelRuntime
from device_agent.settings import AgentSettings
from device_agent.store import SHADOW_SLOT, StateStore
from device_agent.telemetry.recorder import TelemetryRecorder
from device_agent.telemetry.sampling import HardPolicy, InputSampler
from device_agent.update.executor import Executor
from device_agent.update.repair import repair
from edgeota_contract.logs import log_event

if TYPE_CHECKING:
    from device_agent.serving.http_endpoint import Answered, Feedback, InferenceEndpoint

log = logging.getLogger("device_agent")


def build_recorder(settings: AgentSettings) -> TelemetryRecorder:
    """The telemetry recorder the settings describe (the C request path when built, unless ``telemetry_native`` is off)."""
    return TelemetryRecorder(
        background=settings.telemetry_background,
        feature_sample_rate=settings.telemetry_feature_sample_rate,
        native=None if settings.telemetry_native else False,
    )


def build_sampler(settings: AgentSettings, shadow: Callable[[], LoadedModel | None]) -> InputSampler:
    """The raw-input sampler the settings describe (``shadow``: the shadowed candidate, if any, at call time)."""
    return InputSampler(
        settings.state_dir / "samples",
        settings.sample_rate,
        settings.sample_max_files,
        max_per_hour=settings.sample_max_per_hour,
        hard=HardPolicy(
            settings.hard_sample_rate,
            settings.hard_confidence_threshold,
            settings.hard_sample_max_per_hour,
            settings.hard_sample_max_files,
        ),
        shadow=shadow,
    )


def restore_models(
    store: StateStore,
    executor: Executor,
    runtime: ModelRuntime,
    max_boot_attempts: int,
    set_shadow: Callable[[LoadedModel, float], None],
) -> None:
    """Resolve whatever the last process left half done, then serve the active model (and shadow).

    A model that no longer loads is logged (``active_model_load_failed``, ``shadow_model_load_failed``) and
    not served; the agent starts anyway. Raises what :func:`~device_agent.update.repair.repair` raises.
    """
    state = repair(store, executor, max_boot_attempts)
    if state.active_slot is not None:
        try:
            runtime.install(executor.load_slot(state.active_slot))
        except ModelError as exc:
            log_event(log, "active_model_load_failed", level=logging.ERROR, detail=str(exc))
    if state.shadow_deployment is not None and state.slots.get(SHADOW_SLOT) is not None:
        try:
            set_shadow(executor.load_slot(SHADOW_SLOT), state.shadow_sample_rate)
        except ModelError as exc:
            log_event(log, "shadow_model_load_failed", level=logging.ERROR, detail=str(exc))


def open_endpoint(
    settings: AgentSettings,
    runtime: ModelRuntime,
    on_answer: Answered | None = None,
    feedback: Feedback | None = None,
) -> InferenceEndpoint:
    """Open the inference endpoint the settings describe, serving ``runtime``'s current model; ``on_answer`` sees
    every answer with its prediction id, ``feedback`` takes the feedback calls (none: they answer 404).

    Imported here: an embedded agent never loads ``http.server``. Raises what the endpoint's start raises
    (a socket that cannot be bound).
    """
    from device_agent.serving.http_endpoint import EndpointConfig, InferenceEndpoint, socket_mode

    s = settings
    endpoint = InferenceEndpoint(
        EndpointConfig(
            socket_path=s.serve_socket_path,
            socket_mode=socket_mode(s.serve_socket_mode),
            tcp_host=s.serve_tcp_host,
            tcp_port=s.serve_tcp_port,
            token=s.serve_token,
            max_body_bytes=s.serve_max_body_bytes,
        ),
        lambda: runtime.current,
        runtime.predict_on,
        on_answer=on_answer,
        feedback=feedback,
    )
    endpoint.start()
    return endpoint
