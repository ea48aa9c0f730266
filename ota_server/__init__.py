"""edgeota OTA server: releases, devices, staged rollouts over MQTT, telemetry."""
