"""Fixtures for the packager tests: small digits models, keys, fast latency settings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeota_contract.signing import SigningKey, write_keypair
from packager.evaluate import LatencySettings
from packager.examples.digits import DigitsExample, build_digits_example
from packager.profiles import default_profiles_dir

FAST = LatencySettings(warmup=2, rounds=2, runs_per_round=5)


@pytest.fixture(scope="session")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    return build_digits_example(tmp_path_factory.mktemp("mlp"), arch="mlp")


@pytest.fixture(scope="session")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    return build_digits_example(tmp_path_factory.mktemp("cnn"), arch="cnn", epochs=4)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_keypair(tmp_path_factory.mktemp("keys") / "release.pem")


@pytest.fixture
def signing_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def make_profile(tmp_path: Path) -> Callable[..., Path]:
    """Write a profile folder holding a copy of a shipped profile with some fields changed."""
    folder = tmp_path / "profiles"
    folder.mkdir()

    def make(new_id: str, base: str = "x86-avx2", **changes: Any) -> Path:
        data = yaml.safe_load((default_profiles_dir() / f"{base}.yaml").read_text())
        data.pop("id", None)
        for dotted, value in changes.items():
            target = data
            parts = dotted.split("__")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = value
        (folder / f"{new_id}.yaml").write_text(yaml.safe_dump(data))
        return folder

    return make
