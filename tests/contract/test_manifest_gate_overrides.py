"""The manifest's optional `gate_overrides`: signed when present, absent from the signed bytes when not."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from edgeota_contract.bundle import create_bundle, verify_bundle
from edgeota_contract.errors import ContractError
from edgeota_contract.manifest import BundleManifest, GateOverrides, Lineage
from edgeota_contract.signing import SigningKey, TrustedKeys

PAYLOAD = {
    "model.onnx": b"\x08\x07" + b"m" * 100,
    "reference_stats.json": b'{"schema_version":1,"sample_count":0,"features":[]}',
    "test_vectors.npz": b"vectors",
    "model_card.md": b"# card\n",
}
FIELDS: dict[str, object] = dict(
    model_name="detector",
    version="1.0.0",
    release_counter=1_000_000,
    hardware_profile="x86-avx2",
    inputs=[{"name": "x", "dtype": "float32", "shape": [None, 3, 320, 320]}],
    outputs=[{"name": "y", "dtype": "float32", "shape": [None, 10]}],
    opset=17,
    execution_provider="CPUExecutionProvider",
    recipe="fp32",
    metrics={"latency_budget_ms": 40.0},
    lineage=Lineage(
        source_model_sha256="a" * 64,
        packager_version="0.1.0",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        created_by="test",
    ),
)


def test_without_overrides_the_signed_bytes_have_no_such_key(tmp_path: Path) -> None:
    key = SigningKey.generate()
    manifest = create_bundle(tmp_path / "b.tar", PAYLOAD, key, **FIELDS)
    assert manifest.gate_overrides is None
    signed = json.loads(manifest.canonical_bytes())
    assert "gate_overrides" not in signed  # bundles without overrides read as before the field existed
    # A manifest written before the field existed parses, and gives the same bytes back.
    assert BundleManifest.parse(manifest.canonical_bytes()).canonical_bytes() == manifest.canonical_bytes()
    verified = verify_bundle(tmp_path / "b.tar", TrustedKeys([key.public_key]))
    assert verified.manifest.gate_overrides is None


def test_overrides_are_signed_and_read_back(tmp_path: Path) -> None:
    key = SigningKey.generate()
    overrides = GateOverrides(latency_budget_ms=40.0, min_cosine=0.98)
    create_bundle(tmp_path / "b.tar", PAYLOAD, key, gate_overrides=overrides, **FIELDS)
    verified = verify_bundle(tmp_path / "b.tar", TrustedKeys([key.public_key]))
    assert verified.manifest.gate_overrides == overrides
    assert verified.manifest.gate_overrides.given() == {"latency_budget_ms": 40.0, "min_cosine": 0.98}
    signed = json.loads(verified.manifest.canonical_bytes())
    assert signed["gate_overrides"]["latency_budget_ms"] == 40.0


@pytest.mark.parametrize(
    "bad",
    [
        {"latency_budget_ms": 0},
        {"latency_budget_ms": float("inf")},
        {"max_accuracy_drop": 1.5},
        {"min_top1_agreement": -0.1},
        {"min_cosine": 1.1},
        {"min_sqnr_db": float("nan")},
        {"latency_ms": 4},
    ],
)
def test_invalid_overrides_make_an_invalid_manifest(bad: dict[str, float]) -> None:
    manifest = json.loads(BundleManifest(files=_files(), signing_key_id="0" * 16, **FIELDS).canonical_bytes())
    manifest["gate_overrides"] = bad
    with pytest.raises(ContractError, match="gate_overrides"):
        BundleManifest.parse(json.dumps(manifest))


def _files() -> list[dict[str, object]]:
    return [{"name": name, "size": len(data), "sha256": "0" * 64} for name, data in PAYLOAD.items()]
