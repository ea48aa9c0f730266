"""The dashboard: server-rendered pages under ``/ui``, the offline API docs, and their security headers.

:func:`install` mounts it on the app: the routers of ``routes_*`` (their :class:`~ota_server.web.render.UiRoute`
renders errors as HTML pages), and :class:`~ota_server.web.headers.SecurityHeaders`. Templates and static files
live in this package (``templates/``, ``static/``) and ship in the wheel; Swagger UI and ReDoc come from the
``fastapi-offline`` package's files, so nothing loads from a CDN.
"""

from __future__ import annotations

from fastapi import FastAPI

from ota_server.web import models as _models  # noqa: F401  (registers the tables on Base.metadata)
from ota_server.web.auth import SignInThrottle
from ota_server.web.headers import SecurityHeaders


def install(app: FastAPI) -> None:
    """Mount the dashboard's routes (the catch-all 404 last) and the security-headers middleware."""
    from ota_server.web import routes_auth, routes_devices, routes_pages, routes_rollouts, routes_telemetry

    app.state.ui_throttle = SignInThrottle()
    for module in (routes_auth, routes_rollouts, routes_devices, routes_telemetry, routes_pages):
        app.include_router(module.router)
    app.add_middleware(SecurityHeaders)
