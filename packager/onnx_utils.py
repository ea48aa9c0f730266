"""Small ONNX helpers: safe loading with one-line errors, I/O specs, opsets, digests."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from packager.errors import ModelInputError

MAX_MODEL_BYTES = 2 * 1024**3 - 1  # protobuf limit for a single-file model
CONTROL_FLOW_OPS = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True)
class IOSpec:
    name: str
    dtype: str  # ONNX element type name, lower case: float32, int64, ...
    shape: tuple[int | str | None, ...]

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(helper.tensor_dtype_to_np_dtype(getattr(TensorProto, _onnx_name(self.dtype))))

    def to_contract(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


def _dtype_name(elem_type: int) -> str:
    name = helper.tensor_dtype_to_string(elem_type).removeprefix("TensorProto.").lower()
    return {"float": "float32", "double": "float64"}.get(name, name)


def _onnx_name(dtype: str) -> str:
    return {"float32": "FLOAT", "float64": "DOUBLE"}.get(dtype, dtype.upper())


def io_specs(model: onnx.ModelProto, which: str = "input") -> list[IOSpec]:
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    values = graph.input if which == "input" else graph.output
    specs = []
    for vi in values:
        if which == "input" and vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(IOSpec(vi.name, _dtype_name(tt.elem_type), tuple(dims)))
    return specs


def numpy_dtype(spec: IOSpec) -> np.dtype[Any]:
    return np.dtype(helper.tensor_dtype_to_np_dtype(getattr(TensorProto, _onnx_name(spec.dtype))))


def main_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def serialize(model: onnx.ModelProto) -> bytes:
    return bytes(model.SerializeToString(deterministic=True))


def load_onnx_file(path: Path) -> tuple[onnx.ModelProto, bytes]:
    """Read, parse and check an ONNX file. Raises :class:`ModelInputError` with a one-line reason."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelInputError(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelInputError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    return parse_onnx_bytes(data, str(path)), data


def parse_onnx_bytes(data: bytes, label: str = "model") -> onnx.ModelProto:
    if not data:
        raise ModelInputError(f"{label} is empty, not an ONNX model")
    if len(data) > MAX_MODEL_BYTES:
        raise ModelInputError(f"{label} is over 2 GiB; external-data models are not supported")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError / RuntimeError depending on backend
        raise ModelInputError(f"{label} is corrupt or truncated (not a parseable ONNX protobuf)") from exc
    if not model.graph.node and not model.graph.output:
        raise ModelInputError(f"{label} is not an ONNX model (no graph)")
    if any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer):
        raise ModelInputError(f"{label} uses external data files, which are not supported")
    try:
        onnx.checker.check_model(model, full_check=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInputError(f"{label} fails the ONNX checker: {first[:300]}") from exc
    if not io_specs(model, "input"):
        raise ModelInputError(f"{label} has no graph inputs")
    return unknown_placeholder_dims(model)


def unknown_placeholder_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every graph input, output and value_info dimension stored as a number below 1 unknown, in place.

    Some exporters write ``-1`` (or ``0``) for a dynamic dimension instead of a symbolic name;
    to ONNX Runtime both mean "any size" for a graph input, so they are treated as unknown here
    (a batch of -1 would otherwise be taken for a fixed batch). A real zero-length graph
    input could not carry samples anyway.
    """
    graph = model.graph
    for vi in (*graph.input, *graph.output, *graph.value_info):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            continue
        for dim in vi.type.tensor_type.shape.dim:
            if dim.HasField("dim_value") and dim.dim_value < 1:
                dim.Clear()
    return model


def op_types(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(domain, op_type) of every node, subgraphs included, sorted and unique."""
    found: set[tuple[str, str]] = set()

    def walk(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            found.add((node.domain or "", node.op_type))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        walk(g)

    walk(model.graph)
    return sorted(found)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a deterministic unique name, in place (quantizer exclusions refer to names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


def fix_batch_dim(model: onnx.ModelProto, batch: int, axes: dict[str, int] | None = None) -> onnx.ModelProto:
    """Pin the dynamic batch dimension of every graph input (and the outputs sharing it) to ``batch``.

    An input's batch is on axis 0 unless ``axes`` names another (e.g. ``{"state": 1}``); rank-0
    inputs are left alone. An output dimension is pinned when it carries the same symbolic name as
    a pinned input dimension; when every input batches on axis 0, a dynamic first output
    dimension is pinned too (exporters often name output batches differently). Unknown output
    dimensions are left for shape inference.
    """
    axes = axes or {}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    symbols: set[str] = set()
    for vi in out.graph.input:
        dims = vi.type.tensor_type.shape.dim
        axis = axes.get(vi.name, 0)
        if axis < len(dims) and not dims[axis].HasField("dim_value"):
            if dims[axis].HasField("dim_param"):
                symbols.add(dims[axis].dim_param)
            dims[axis].Clear()
            dims[axis].dim_value = batch
    for vi in out.graph.output:
        dims = vi.type.tensor_type.shape.dim
        for i, dim in enumerate(dims):
            named = dim.HasField("dim_param") and dim.dim_param in symbols
            if named or (i == 0 and not axes and not dim.HasField("dim_value")):
                dim.Clear()
                dim.dim_value = batch
    # Intermediate value_info may carry the old symbolic batch; shape inference re-derives it.
    del out.graph.value_info[:]
    return out


def fixed_batch(model: onnx.ModelProto, axes: dict[str, int]) -> int | None:
    """The model's own fixed batch (the first non-scalar input's sample axis), or None when dynamic."""
    for spec in io_specs(model, "input"):
        if spec.shape:
            dim = spec.shape[axes.get(spec.name, 0)]
            return dim if isinstance(dim, int) else None
    return None
