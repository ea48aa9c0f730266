"""What the agent observes of live inference: windows per model version (:mod:`.recorder`, :mod:`.windows`,
:mod:`.summaries`, the background :mod:`.worker`), the offline spool (:mod:`.spool`) and raw-input samples for
retraining (:mod:`.sampling`). The C request path stays ``device_agent._telemetry_native``."""
