"""The version is defined once: the installed distribution's metadata, shared by the CLI and the packager."""

from __future__ import annotations

import importlib.metadata

import pytest
from typer.testing import CliRunner

import edgeota
import edgeota_contract.version as version_module
from edgeota.cli import app


def test_every_component_reports_the_distribution_version() -> None:
    expected = importlib.metadata.version("edgeota")
    assert version_module.__version__ == expected == version_module.edgeota_version()
    assert edgeota.__version__ == expected
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == expected


def test_a_tree_that_was_never_installed_reports_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version_module, "_distribution_version", missing)
    assert version_module.edgeota_version() == version_module.UNKNOWN_VERSION == "0+unknown"
