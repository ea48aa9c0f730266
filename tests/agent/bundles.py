"""Test bundles around tiny ONNX models built with the onnx package (tests only; the agent never imports onnx)."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeota_contract.bundle import create_bundle, sha256_file
from edgeota_contract.manifest import Lineage, release_counter_from_version
from edgeota_contract.signing import SigningKey
from edgeota_contract.telemetry import FeatureReference, OutputReference, ReferenceStats

FEATURES = 64
CLASSES = 10
SLOW_CHAIN = 400


def make_model(seed: int = 0, variant: str = "ok") -> bytes:
    """x[N,64] -> (Log x if variant=='log') -> (400 identity MatMuls if 'slow') -> MatMul -> Add -> Softmax."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    b = rng.normal(size=(CLASSES,)).astype(np.float32)
    nodes = []
    inits = []
    src = "x"
    if variant == "log":
        nodes.append(helper.make_node("Log", ["x"], ["lx"]))
        src = "lx"
    if variant == "slow":  # same function, much more work: a chain of identity matmuls
        inits.append(numpy_helper.from_array(np.eye(FEATURES, dtype=np.float32), "eye"))
        for i in range(SLOW_CHAIN):
            nodes.append(helper.make_node("MatMul", [src, "eye"], [f"id{i}"]))
            src = f"id{i}"
    nodes += [
        helper.make_node("MatMul", [src, "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), *inits],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def reference_model(x: np.ndarray, seed: int = 0, variant: str = "ok") -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(FEATURES, CLASSES)).astype(np.float32)
    b = rng.normal(size=(CLASSES,)).astype(np.float32)
    src = np.log(x) if variant == "log" else x
    logits = src @ w + b
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return np.asarray((e / e.sum(axis=-1, keepdims=True)).astype(np.float32))


def sample_inputs(n: int = 4, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.1, 1.0, size=(n, FEATURES)).astype(np.float32)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def make_payload(seed: int = 0, variant: str = "ok", nan_vectors: bool = False) -> dict[str, bytes]:
    x = sample_inputs()
    y = reference_model(x, seed, "log" if variant == "log" else "ok")
    model = (
        b"this is not an onnx model" if variant == "broken" else make_model(seed, "log" if variant == "log" else "ok")
    )
    if variant == "wrong_vectors":
        y = np.roll(y, 1, axis=1)
    ref = ReferenceStats(
        sample_count=100,
        features=[
            FeatureReference(input="x", feature=i, edges=[0.25, 0.5, 0.75], counts=[25, 25, 25, 25])
            for i in range(FEATURES)
        ],
        outputs=[OutputReference(output="y", kind="classes", class_counts=[10] * CLASSES)],
    )
    return {
        "model.onnx": model,
        "reference_stats.json": ref.model_dump_json().encode(),
        "test_vectors.npz": _npz({"in.x": x, "out.y": y}),
        "model_card.md": b"# tiny test model\n",
    }


def make_bundle(
    out: Path,
    key: SigningKey,
    *,
    version: str = "1.0.0",
    profile: str = "x86_64-avx2",
    model_name: str = "digits",
    seed: int = 0,
    variant: str = "ok",
    metrics: dict[str, float] | None = None,
    inputs: list[dict[str, Any]] | None = None,
    payload: dict[str, bytes] | None = None,
) -> tuple[Path, str]:
    """Write a signed bundle (of ``payload``, default :func:`make_payload`); return (path, archive sha256)."""
    create_bundle(
        out,
        payload if payload is not None else make_payload(seed, variant),
        key,
        model_name=model_name,
        version=version,
        release_counter=release_counter_from_version(version),
        hardware_profile=profile,
        inputs=inputs or [{"name": "x", "dtype": "float32", "shape": [None, FEATURES]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [None, CLASSES]}],
        opset=17,
        execution_provider="CPUExecutionProvider",
        recipe="fp32",
        metrics={"smoke_atol": 1e-4, "smoke_rtol": 1e-3, **(metrics or {})},
        lineage=Lineage(
            source_model_sha256="a" * 64,
            packager_version="0.1.0",
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            created_by="tests",
        ),
    )
    return out, sha256_file(out)


def dumps(value: Any) -> str:
    return json.dumps(value)
