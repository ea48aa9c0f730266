"""Fixtures for the evaluation tests: the digits MLP, a deliberately worse copy, signed bundles, an export."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeota_contract.bundle import create_bundle
from edgeota_contract.manifest import Lineage
from edgeota_contract.signing import SigningKey, TrustedKeys


@dataclass(frozen=True)
class Models:
    good: Path
    wrong: Path
    images: np.ndarray
    labels: np.ndarray
    key: SigningKey


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from packager.examples.digits import build_digits_example, make_degraded_variant

    root = tmp_path_factory.mktemp("eval-models")
    example = build_digits_example(root, arch="mlp", epochs=60)
    wrong = make_degraded_variant(example.model_path, root / "wrong.onnx", kind="wrong", share=0.3)
    data = np.load(example.eval_path)
    return Models(example.model_path, wrong, data["input"].astype(np.float32), data["labels"], SigningKey.generate())


def bundle_for(
    out: Path,
    model: Path,
    key: SigningKey,
    version: str,
    profile: str,
    model_name: str = "digits",
    input_name: str = "input",
) -> Path:
    """A signed bundle holding ``model`` for ``profile`` (the manifest the packager would write, trimmed)."""
    major, minor, patch = (int(p) for p in version.split("."))
    path = out / f"{model_name}-{version}-{profile}.bundle.tar"
    create_bundle(
        path,
        {
            "model.onnx": model.read_bytes(),
            "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
            "test_vectors.npz": b"vectors",
            "model_card.md": b"# card\n",
        },
        key,
        model_name=model_name,
        version=version,
        release_counter=major * 1_000_000 + minor * 1_000 + patch,
        hardware_profile=profile,
        inputs=[{"name": input_name, "dtype": "float32", "shape": ["N", 64]}],
        outputs=[{"name": "logits", "dtype": "float32", "shape": ["N", 10]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="fp32",
        metrics={},
        lineage=Lineage(
            source_model_sha256="a" * 64,
            packager_version="0.1.0",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            created_by="tests",
        ),
    )
    return path


@pytest.fixture
def trusted(models: Models) -> TrustedKeys:
    keys = TrustedKeys()
    keys.add(models.key.public_key)
    return keys


def split_cohorts(n: int) -> dict[str, Any]:
    """Cohorts north/south (every other row) and one profile; a tenth of rows unlabelled later."""
    return {"cohorts": ["north" if i % 2 else "south" for i in range(n)], "profiles": ["x86"] * n}
