"""The REST client stands apart from the server, and the server's modules import each other without cycles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.packaging.test_import_cycles import find_cycles, import_graph

ROOT = Path(__file__).resolve().parents[2]


def test_client_imports_neither_fastapi_nor_sqlalchemy() -> None:
    """A client of the API (the CLI, the simulator, scripts) needs none of the server's frameworks."""
    code = (
        "import sys, ota_server.client, ota_server.api.responses, ota_server.cli_common\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'sqlalchemy', 'starlette'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_the_check_sees_the_server_frameworks() -> None:
    """The probe above would report a module that pulls in FastAPI (so it can fail)."""
    code = (
        "import sys, ota_server.api.deps\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'sqlalchemy'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "['fastapi', 'sqlalchemy']"


def test_ota_server_has_no_import_cycles() -> None:
    """Every import counts, at module level or inside a function (the CLI modules once imported each other)."""
    graph = import_graph(["ota_server"])
    assert "ota_server.cli_common" in graph["ota_server.cli_telemetry"]
    assert "ota_server.cli" not in graph["ota_server.cli_telemetry"]
    assert find_cycles(graph) == []
