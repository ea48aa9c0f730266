"""Alert rules over fleet telemetry and field accuracy, with de-duplication, cooldown and signed delivery.

- :mod:`~ota_server.alerts.config`: the rules file (typed, validated at load with one-line errors);
- :mod:`~ota_server.alerts.evaluate`: pure rule evaluation -> observations with fingerprints;
- :mod:`~ota_server.alerts.lifecycle`: pure de-duplication, cooldown and resolve decisions;
- :mod:`~ota_server.alerts.service`: one round in one transaction, listing and acknowledgement;
- :mod:`~ota_server.alerts.delivery`: exports, webhooks (HMAC, :mod:`~ota_server.alerts.signing`) and commands
  after the commit;
- :mod:`~ota_server.alerts.loop`: the periodic round in the core process;
- :mod:`~ota_server.alerts.records` and :mod:`~ota_server.alerts.metrics`: tables and Prometheus families.

``docs/alerts.md`` is the operator's guide. Submodules are imported where used (no re-exports), so the
metrics and the API do not pull in the evaluation code.
"""
