"""OpenAPI fuzzing (schemathesis) on SQLite and on PostgreSQL, with a token of each role: no input,
authenticated or not, produces a 5xx, and every answer the schema describes matches its response schema.

Generated text includes NUL and other characters PostgreSQL cannot store. The admin, who may call every
operation, gets the most examples; the other roles are refused early on most operations, so fewer
examples cover them. One app (and database) per backend and role serves all its operations.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from edgeota_contract.signing import SigningKey, write_keypair
from ota_server.core.config import Settings
from ota_server.core.security import Role
from ota_server.main import create_app
from tests.conftest import PG_ADMIN_URL

from .conftest import ADMIN, AUTH

pytestmark = pytest.mark.integration

ADMIN_EXAMPLES = 30
OTHER_EXAMPLES = 8
_TMP = Path(tempfile.mkdtemp(prefix="edgeota-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)
_, _PUB = write_keypair(_TMP / "release.pem", SigningKey.generate())


def _settings(folder: Path, url: str) -> Settings:
    return Settings(
        data_dir=folder / "data",
        database_url=url,
        release_keys=[_PUB],
        admin_token=ADMIN,
        mqtt_enabled=False,
        engine_enabled=False,
        max_bundle_bytes=100_000,
    )


# The OpenAPI document does not depend on the database: load it once; each target app answers the calls.
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(_settings(_TMP / "doc", "sqlite://")))
schema.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE], allow_x00=True
)


@dataclass
class Target:
    app: FastAPI
    headers: dict[str, str]


@contextmanager
def _target(db: str, role: Role) -> Iterator[Target]:
    """A fresh database on ``db``, an app over it, and the headers of a token with ``role``."""
    folder = _TMP / f"{db}-{role.value}"
    name = f"edgeota_fuzz_{uuid.uuid4().hex[:12]}"
    if db == "sqlite":
        url = f"sqlite:///{folder / 'fuzz.db'}"
        folder.mkdir(parents=True)
    else:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    app = create_app(_settings(folder, url))
    try:
        with TestClient(app) as client:
            headers = AUTH
            if role != Role.ADMIN:
                made = client.post("/api/v1/tokens", json={"role": role.value, "name": f"fuzz {role}"}, headers=AUTH)
                assert made.status_code == 201, made.text
                headers = {"Authorization": f"Bearer {made.json()['token']}"}
        yield Target(app, headers)
    finally:
        app.state.ctx.engine.dispose()
        if db != "sqlite":
            with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def admin_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with _target(request.param, Role.ADMIN) as target:
        yield target


@pytest.fixture(
    scope="module",
    params=[
        (db, role) for db in ("sqlite", "postgresql") for role in (Role.RELEASE_MANAGER, Role.OPERATOR, Role.VIEWER)
    ],
    ids=lambda p: f"{p[0]}-{p[1].value}",
)
def role_target(request: pytest.FixtureRequest) -> Iterator[Target]:
    with _target(*request.param) as target:
        yield target


CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.mark.filterwarnings("ignore")
@schema.parametrize()
@settings(max_examples=ADMIN_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors_as_admin(case: schemathesis.Case, admin_target: Target) -> None:
    case.call_and_validate(app=admin_target.app, headers=admin_target.headers, checks=CHECKS)


@pytest.mark.filterwarnings("ignore")
@schema.parametrize()
@settings(max_examples=OTHER_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzz_no_server_errors_as_each_other_role(case: schemathesis.Case, role_target: Target) -> None:
    case.call_and_validate(app=role_target.app, headers=role_target.headers, checks=CHECKS)
