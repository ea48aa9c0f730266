"""edgeota device agent: verified, crash-safe model swaps, inference and telemetry.

Imports nothing of torch, fastapi or sqlalchemy (tests/agent/test_import_light.py proves it).
"""
