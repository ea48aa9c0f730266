"""Two ingest writers (two processes of a shared subscription) with messages of one device: the second waits for
the first's transaction, so a check-in is never judged against a watermark that a concurrent report moved.

Before the batch locked its devices, a check-in read the device's watermark and deployments while another writer
committed a newer ``committed`` report: the check-in, older than that report, was not seen as stale, overwrote the
newer watermark, and could land the just-committed install as "device went back".
"""

from __future__ import annotations

import threading
import uuid

from fastapi.testclient import TestClient
from sqlalchemy import select

from edgeota_contract.states import DeploymentState
from ota_server.context import ServerContext
from ota_server.ingest_queue import apply_batch, writer_sessions
from ota_server.models import Deployment, Device
from ota_server.services import ingest, ingest_prefetch

from .conftest import BundleFactory
from .helpers import BOOT, checkin_message, status_report
from .test_ingest_batch import fleet, status


def test_a_writer_waits_for_another_writers_batch_of_the_same_device(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    a = fleet(client, ctx, make_bundle, 1)["dev0"]
    sessions, engine = writer_sessions(ctx)
    try:
        for state in (DeploymentState.DOWNLOADING, DeploymentState.INSTALLING, DeploymentState.TRIAL):
            assert apply_batch(ctx, sessions, [status(a, state)]) == ["ok"]
        # Built before the committed report (lower seq): the device still showed nothing running.
        old_checkin = checkin_message("x86", [], active=a.deployment_id, boot_id=BOOT)
        committed = status(a, DeploymentState.COMMITTED)
        newest_seq = status_report(a, DeploymentState.COMMITTED).seq - 1  # the committed report's seq

        outcome: list[list[str]] = []
        with sessions() as first, first.begin():
            known = ingest_prefetch.prefetch(first, [(a.device_id, old_checkin)])
            second = threading.Thread(target=lambda: outcome.append(apply_batch(ctx, sessions, [committed])))
            second.start()
            second.join(timeout=1.5)
            waited = second.is_alive()  # the other writer is held until this batch commits
            ingest.apply_message(first, a.device_id, old_checkin, known)
        second.join(timeout=30)
        assert waited, "the second writer applied a report of a device whose batch was still open"
        assert outcome == [["ok"]]

        with ctx.sessions() as session:
            dep = session.scalars(select(Deployment).where(Deployment.id == a.deployment_id)).one()
            device = session.get(Device, a.device_id)
            assert device is not None
            assert dep.state == DeploymentState.COMMITTED.value, (dep.state, dep.reason, dep.detail)
            assert device.report_seq == newest_seq  # the newer report's watermark, not the check-in's
    finally:
        if engine is not None:
            engine.dispose()


def test_a_batchs_device_lock_does_not_block_a_new_deployment_of_that_device(
    client: TestClient, ctx: ServerContext, make_bundle: BundleFactory
) -> None:
    """A batch locks its devices FOR NO KEY UPDATE: a rollout inserting deployments of those devices (a foreign key,
    so a key-share lock on each device) goes on meanwhile. With FOR UPDATE the two waited for each other and a
    10,000-device rollout could not be created while ingest ran (a deadlock, retried until it gave up: 503).
    SQLite has one writer at a time, so there the insert waits for the batch."""
    a = fleet(client, ctx, make_bundle, 1)["dev0"]
    sessions, engine = writer_sessions(ctx)
    try:
        with sessions() as first, first.begin():
            ingest_prefetch.prefetch(first, [(a.device_id, checkin_message("x86", [], boot_id=BOOT))])

            def insert() -> None:
                with ctx.sessions() as other, other.begin():
                    dep = other.get(Deployment, a.deployment_id)
                    assert dep is not None
                    other.add(
                        Deployment(
                            id=uuid.uuid4().hex,
                            device_id=a.device_id,
                            mode="install",
                            stage=0,
                            model_name=dep.model_name,
                            version=dep.version,
                            bundle_sha256=dep.bundle_sha256,
                            release_counter=dep.release_counter,
                            state=DeploymentState.PENDING.value,
                            created_at=dep.created_at,
                            updated_at=dep.updated_at,
                        )
                    )

            other = threading.Thread(target=insert)
            other.start()
            other.join(timeout=3)
            blocked = other.is_alive()
        other.join(timeout=30)
        assert blocked == ctx.settings.resolved_database_url.startswith("sqlite")
        with ctx.sessions() as session:
            assert len(session.scalars(select(Deployment).where(Deployment.device_id == a.device_id)).all()) == 2
    finally:
        if engine is not None:
            engine.dispose()
