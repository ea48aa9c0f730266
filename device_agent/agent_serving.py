"""The serving side of :class:`~device_agent.agent.Agent`: predictions, feedback on them, and the shadow candidate.

:class:`ServingMixin` holds :meth:`~ServingMixin.predict`, :meth:`~ServingMixin.predict_tracked` and
:meth:`~ServingMixin.feedback` (the application's calls), the two hooks the local inference endpoint is given
(remember an answer, take a feedback request) and the switch of the shadowed candidate. ``Agent`` supplies the
state it works on: the serving runtime, the prediction memory, the shadow runner and, while started, the outbox.
Imports numpy only when first used, and never torch, fastapi or sqlalchemy.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from device_agent._lazy import lazy_module
from device_agent.serving.predictions import (
    PREDICTION_ID,
    Prediction,
    PredictionMemory,
    feedback_answer,
    feedback_item,
    parse_feedback,
    record,
)
from device_agent.serving.runtime import LoadedModel, ModelRuntime
from device_agent.serving.shadow import ShadowRunner
from edgeota_contract.logs import log_event
from edgeota_contract.messages import FeedbackItem, new_id

if TYPE_CHECKING:
    import numpy as np

    from device_agent.transport.outbox import Outbox
else:
    np = lazy_module("numpy")

log = logging.getLogger("device_agent")


class ServingMixin:
    """Inference, feedback and shadow calls of the agent (mixed into :class:`~device_agent.agent.Agent`)."""

    runtime: ModelRuntime
    predictions: PredictionMemory
    """Recent answers by prediction id (the endpoint's and :meth:`predict_tracked`'s), for :meth:`feedback`."""
    shadow: ShadowRunner | None

    if TYPE_CHECKING:

        @property
        def outbox(self) -> Outbox: ...

    # ------------------------------------------------------------------ shadow

    def _set_shadow(self, candidate: LoadedModel | None, sample_rate: float) -> None:
        """Start shadowing ``candidate`` (replacing any earlier one), or stop with None."""
        old, self.shadow = self.shadow, None
        if old is not None:
            self.runtime.remove_listener(old)
            old.stop()
        if candidate is not None:
            self.shadow = ShadowRunner(candidate, sample_rate)
            self.runtime.add_listener(self.shadow)
            log_event(log, "shadow_started", version=candidate.manifest.version, sample_rate=sample_rate)

    # ------------------------------------------------------------------ inference and feedback

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the serving model on ``inputs`` (name -> array). Never sees a half-swapped model.

        Raises:
            NoModelError: no model installed yet.
            ModelError: bad inputs or an inference failure.
        """
        return self.runtime.predict(inputs)

    def predict_tracked(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Prediction]:
        """:meth:`predict`, and remember the answer for :meth:`feedback`: returns the outputs and the
        :class:`~device_agent.serving.predictions.Prediction` (its ``prediction_id``, release, top-1 per row).

        Raises as :meth:`predict`.
        """
        model = self.runtime.current
        prediction_id = new_id()
        token = PREDICTION_ID.set(prediction_id)  # the sampler tags kept inputs with it
        try:
            outputs = self.runtime.predict_on(model, inputs)  # NoModelError when model is None
        finally:
            PREDICTION_ID.reset(token)
        assert model is not None
        return outputs, record(self.predictions, prediction_id, model.manifest, model.bundle_sha256, outputs)

    def feedback(
        self, prediction_id: str, *, label: int | str | None = None, reward: float | None = None, row: int = 0
    ) -> FeedbackItem:
        """Report the true ``label`` (a class index) and/or a ``reward`` in [0, 1] for a remembered prediction;
        the item is spooled (durable) before this returns and sent to the server until acked.

        Raises:
            FeedbackError: unknown or expired prediction (``status`` 404), or a bad value (400).
            EdgeotaError: the agent is not started.
        """
        item = feedback_item(self.predictions, prediction_id, label=label, reward=reward, row=row)
        self.outbox.add_feedback([item])
        return item

    def _remember(self, model: LoadedModel, outputs: dict[str, np.ndarray], prediction_id: str) -> None:
        if self.predictions.max_predictions > 0:  # feedback off: no per-request work at all
            record(self.predictions, prediction_id, model.manifest, model.bundle_sha256, outputs)

    def _endpoint_feedback(self, model_name: str, body: bytes) -> dict[str, object]:
        """The endpoint's feedback call: every item valid and spooled as one report, or none (raises FeedbackError)."""
        items = parse_feedback(body, self.predictions, model_name)
        return feedback_answer(self.outbox.add_feedback(items).msg_id, items)
