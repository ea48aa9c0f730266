"""edgeota packager: per-hardware-profile optimisation passes, gates, and signed bundles."""
