"""OpenAPI fuzzing (schemathesis): no input, authenticated or not, produces a 5xx."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from edgeota_contract.signing import SigningKey, write_keypair
from ota_server.core.config import Settings
from ota_server.main import create_app

from .conftest import ADMIN

_TMP = Path(tempfile.mkdtemp(prefix="edgeota-fuzz-"))
atexit.register(shutil.rmtree, _TMP, True)
_, _PUB = write_keypair(_TMP / "release.pem", SigningKey.generate())
APP = create_app(
    Settings(
        data_dir=_TMP / "data",
        release_keys=[_PUB],
        admin_token=ADMIN,
        mqtt_enabled=False,
        engine_enabled=False,
        max_bundle_bytes=100_000,
    )
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@pytest.mark.filterwarnings("ignore")
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=[not_a_server_error])
