"""``edgeota server ingest``: a process that only ingests device messages, one of several sharing the load.

Each process joins the MQTT shared-subscription group ``mqtt_shared_group`` (``$share/<group>/...``), so the
broker hands each device message to one process of the group; the ``edgeota server run`` processes (API,
rollout engine) may join the group too, or set ``mqtt_subscribe = false`` and only publish. Nothing here
depends on which process gets a message: a message is applied once whoever gets it (its id is stored in the
same transaction, so a re-delivery is only acknowledged again), a status report moves a deployment only along
the allowed transitions (an older report arriving after a newer one changes nothing), a check-in older than the
newest applied report is ignored by the per-device watermark, and telemetry windows are keyed by (device, boot,
sequence) and merged by addition. So per-device order is made irrelevant rather than kept: see
``docs/deploy.md``.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import typer

from edgeota_contract.errors import ContractError
from edgeota_contract.states import ReasonCode


def server_ingest(
    config: Path | None = typer.Option(None, "--config", help="TOML config file (env vars override it)"),
    instance: int = typer.Option(
        0, "--instance", min=0, max=999, help="this process's number in the group: its MQTT session is <id>-ingest-N"
    ),
) -> None:
    """Ingest device messages as one process of the mqtt_shared_group (no HTTP, no rollout engine).

    The database must already be migrated (by `edgeota server run`). Stops cleanly on SIGTERM/SIGINT after
    applying what it holds.
    """
    import logging

    from edgeota_contract.logs import configure_logging, log_event
    from ota_server.core.config import Settings
    from ota_server.db import is_at_head
    from ota_server.main import build_context
    from ota_server.mqtt_bridge import MqttBridge

    settings = Settings.load(config)
    if not settings.mqtt_shared_group:
        raise ContractError(
            "server ingest needs mqtt_shared_group (EDGEOTA_SERVER_MQTT_SHARED_GROUP): without a group every "
            "process would get every message",
            ReasonCode.MALFORMED_MESSAGE,
        )
    settings = settings.model_copy(
        update={
            "mqtt_client_id": f"{settings.resolved_mqtt_client_id}-ingest-{instance}",
            "engine_enabled": False,
            "mqtt_subscribe": True,
        }
    )
    configure_logging(settings.log_level)
    log = logging.getLogger("edgeota.server.ingest")
    ctx = build_context(settings, migrate=False)
    if not is_at_head(ctx.engine):
        raise ContractError(
            "the database is not migrated to this version: start `edgeota server run` once first",
            ReasonCode.MALFORMED_MESSAGE,
        )
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    bridge = MqttBridge(ctx)
    ctx.publisher = bridge
    if not bridge.start():
        log_event(log, "mqtt_not_connected_yet", logging.WARNING)
    log_event(log, "ingest_started", group=settings.mqtt_shared_group, client_id=settings.mqtt_client_id)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        bridge.stop()
        counts = ctx.metrics.snapshot()
        log_event(log, "ingest_stopped", **{k: v for k, v in counts.items() if k.startswith("ingest")})
        ctx.engine.dispose()
