"""The app factory: ``create_app(settings) -> FastAPI``.

Creating the app migrates the database to head, loads (or generates) the server key and the
trusted release keys, and builds the shared context. Starting it (lifespan) connects the MQTT
bridge and starts the rollout engine loop when enabled; stopping it stops both cleanly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from edgeota_contract.errors import ContractError
from edgeota_contract.logs import log_event
from edgeota_contract.signing import TrustedKeys, public_pem
from edgeota_contract.states import ReasonCode
from ota_server.api.routes import (
    alerts,
    audit,
    device_commands,
    device_decommission,
    devices,
    evaluations,
    feedback,
    health,
    metrics,
    releases,
    rollouts,
    samples,
    telemetry,
    tokens,
    tuf,
)
from ota_server.artifacts import ArtifactStore, LocalArtifactStore
from ota_server.context import ServerContext
from ota_server.core.config import Settings
from ota_server.core.problems import install_problem_handlers
from ota_server.core.security import load_or_create_server_key
from ota_server.core.unstorable import RefuseUnstorableText
from ota_server.db import make_engine, make_sessionmaker, upgrade_to_head
from ota_server.engine_leader import choose as choose_leadership
from ota_server.tuf_service import TufRefresher, open_repository, prepare_repository
from ota_server.web import install as install_dashboard

log = logging.getLogger("edgeota.server")
# Every router of the API, in the order they are mounted.
ROUTE_MODULES = (
    health,
    tokens,
    audit,
    releases,
    devices,
    device_decommission,
    device_commands,
    rollouts,
    samples,
    telemetry,
    feedback,
    alerts,
    evaluations,
    tuf,
    metrics,
)


def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The configured bundle store. Raises ContractError (one line) when the object store is not usable."""
    if settings.artifact_store == "local":
        return LocalArtifactStore(settings.resolved_artifact_dir)
    from ota_server.artifacts_s3 import ArtifactStoreError, S3ArtifactStore, S3Config

    if not settings.s3_bucket:
        raise ContractError("artifact_store = 's3' needs s3_bucket", ReasonCode.MALFORMED_MESSAGE)
    secret = settings.s3_secret_access_key
    config = S3Config(
        bucket=settings.s3_bucket,
        prefix=settings.s3_prefix,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=secret.get_secret_value() if secret is not None else None,
        presign_seconds=settings.s3_presign_seconds,
        redirect_downloads=settings.s3_redirect_downloads,
    )
    try:
        # The server reads some bundles itself (drift references, TUF targets): a local copy is kept.
        return S3ArtifactStore(config, settings.data_dir / "artifact_cache")
    except ArtifactStoreError as exc:
        raise ContractError(str(exc), ReasonCode.MALFORMED_MESSAGE) from exc


def build_context(settings: Settings, migrate: bool = True) -> ServerContext:
    """Migrate the database (unless ``migrate`` is false: an API worker whose core already did) and load keys.

    Raises ContractError/SignatureError on bad configuration.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    settings.tmp_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        choose_leadership(engine, settings.engine_leadership)
    except ValueError as exc:
        raise ContractError(str(exc), ReasonCode.MALFORMED_MESSAGE) from exc
    if migrate:
        try:
            upgrade_to_head(engine)
        except Exception as exc:
            raise ContractError(f"cannot migrate database: {exc}", ReasonCode.INTERNAL_ERROR) from exc
    release_keys = TrustedKeys.from_files(settings.release_keys)
    if settings.alert_rules_file is not None and migrate:
        from ota_server.alerts.loop import rules_from_settings

        rules_from_settings(settings)  # a bad rules file stops the start with one line, before anything runs
    tuf_repo = open_repository(settings)
    if tuf_repo is not None and migrate:
        prepare_repository(tuf_repo, settings, make_sessionmaker(engine))
    return ServerContext(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        store=open_artifact_store(settings),
        server_key=load_or_create_server_key(settings.resolved_server_key),
        release_keys=release_keys,
        release_key_pems=[public_pem(release_keys.get(k)).decode() for k in release_keys.key_ids],  # type: ignore[arg-type]
        tuf=tuf_repo,
    )


def start_core(ctx: ServerContext, settings: Settings) -> Callable[[], None]:
    """Start the MQTT bridge and the rollout engine loop (each when enabled); return what stops both.

    The bridge becomes ``ctx.publisher``. A broker that is not reachable yet is logged, not fatal: the
    bridge keeps reconnecting.
    """
    from ota_server.engine import EngineLoop
    from ota_server.mqtt_bridge import MqttBridge

    bridge = None
    loop = None
    if settings.mqtt_enabled:
        bridge = MqttBridge(ctx)
        ctx.publisher = bridge
        if not bridge.start():
            log_event(log, "mqtt_not_connected_yet", logging.WARNING)
    if settings.engine_enabled:
        loop = EngineLoop(ctx)
        loop.start()
    alert_loop = _alert_loop(ctx, settings)
    refresher = TufRefresher(ctx.tuf, settings.tuf_refresh_seconds) if ctx.tuf is not None else None
    if refresher is not None:
        refresher.start()

    def stop() -> None:
        if alert_loop is not None:
            alert_loop.stop()
        if refresher is not None:
            refresher.stop()
        if loop is not None:
            loop.stop()
        if bridge is not None:
            bridge.stop()

    return stop


def _alert_loop(ctx: ServerContext, settings: Settings) -> Any:
    """The alert loop (``ota_server.alerts.loop.AlertLoop``), started, when rules are configured and the engine
    runs here; else None."""
    if settings.alert_rules_file is None or not settings.engine_enabled:
        return None
    from ota_server.alerts.loop import AlertLoop, rules_from_settings

    rules = rules_from_settings(settings)
    assert rules is not None
    loop = AlertLoop(ctx, rules)
    loop.start()
    return loop


def create_app(settings: Settings | None = None, ctx: ServerContext | None = None) -> FastAPI:
    settings = settings or Settings.load()
    ctx = ctx or build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        # Few worker threads: sync routes are short, and many threads only fight over the GIL.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        stop_core = start_core(ctx, settings)
        log_event(log, "server_started", public_url=settings.public_url)
        try:
            yield
        finally:
            stop_core()
            ctx.engine.dispose()
            log_event(log, "server_stopped")

    # /docs and /redoc are the dashboard's (ota_server.web): Swagger UI and ReDoc from packaged files, no CDN.
    app = FastAPI(title="edgeota OTA server", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_problem_handlers(app)
    # NUL and other text a database cannot store: 422 before any route or query sees it.
    app.add_middleware(RefuseUnstorableText)
    for module in ROUTE_MODULES:
        app.include_router(module.router)
    install_dashboard(app)
    return app
