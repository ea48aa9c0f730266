"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST API) as pure functions over bytes and dicts.

No I/O here: :mod:`device_agent.serving.http_endpoint` reads requests and writes answers.
:func:`route` maps a method and path to an endpoint; :func:`decode_infer` turns an inference request
(JSON, or JSON followed by binary tensor data: Triton's binary tensor data extension) into numpy inputs
checked against the bundle manifest; :func:`encode_infer` builds the answer, with each output as JSON
``data`` or as binary data after the JSON header, as the request asked.

Guarantees: every problem with a request raises :class:`ProtocolError` carrying the HTTP status of the
answer (400 bad request, 404 unknown model or path, 405 wrong method) and a one-line message for the
protocol's error body ``{"error": "..."}``; no other exception escapes for any request bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from device_agent._lazy import lazy_module
from edgeota_contract.errors import EdgeotaError
from edgeota_contract.manifest import BundleManifest, TensorSpec
from edgeota_contract.states import ReasonCode

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")

PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ("binary_tensor_data", "edgeota_feedback")
HEADER_LENGTH = "Inference-Header-Content-Length"

# Protocol datatype <-> numpy dtype name (little-endian, as the binary extension fixes the byte order).
_TO_NUMPY = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}
_FROM_NUMPY = {v: k for k, v in _TO_NUMPY.items()}
_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32"}


class ProtocolError(EdgeotaError):
    """A request the endpoint refuses; ``status`` is the HTTP status of the error answer (4xx)."""

    default_reason = ReasonCode.MALFORMED_MESSAGE

    def __init__(self, status: int, message: str, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.allow = allow
        """For 405: the methods the path takes (the ``Allow`` header)."""


def datatype_of(dtype: str) -> str:
    """The protocol datatype of a manifest dtype (``float32`` -> ``FP32``); BYTES for strings."""
    name = _ALIASES.get(dtype, dtype)
    if name == "string":
        return "BYTES"
    return _FROM_NUMPY.get(name, name.upper())


def error_body(message: str) -> bytes:
    """The protocol's error answer."""
    return json.dumps({"error": message}).encode("utf-8")


# ------------------------------------------------------------------ routing


@dataclass(frozen=True)
class Route:
    """What a request path names: ``endpoint`` is one of ``server``, ``live``, ``ready``, ``model``,
    ``model_ready``, ``infer``, ``feedback`` (the agent's extension: a true label or reward for a prediction);
    ``model`` and ``version`` come from the path (version may be None)."""

    endpoint: str
    model: str | None = None
    version: str | None = None


_MODEL_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?(/ready|/infer|/feedback)?$")
_TAILS = {None: "model", "/ready": "model_ready", "/infer": "infer", "/feedback": "feedback"}
_FIXED = {"/v2": "server", "/v2/health/live": "live", "/v2/health/ready": "ready"}
_METHODS = {
    "server": "GET",
    "live": "GET",
    "ready": "GET",
    "model": "GET",
    "model_ready": "GET",
    "infer": "POST",
    "feedback": "POST",
}


def route(method: str, path: str) -> Route:
    """Map ``method`` and ``path`` (query string ignored) to a :class:`Route`.

    Raises:
        ProtocolError: 404 for a path the protocol does not have, 405 for a method the path does not take.
    """
    path = path.split("?", 1)[0].rstrip("/") or "/"
    found: Route | None = None
    if path in _FIXED:
        found = Route(_FIXED[path])
    else:
        m = _MODEL_PATH.match(path)
        if m is not None:
            found = Route(_TAILS[m.group(3)], m.group(1), m.group(2))
    if found is None:
        raise ProtocolError(404, f"no such endpoint: {path}")
    allowed = _METHODS[found.endpoint]
    if method != allowed and not (method == "HEAD" and allowed == "GET"):
        raise ProtocolError(405, f"{method} is not allowed on {path} (use {allowed})", allow=allowed)
    return found


# ------------------------------------------------------------------ metadata


def _shape(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def model_metadata(manifest: BundleManifest) -> dict[str, Any]:
    """The model metadata answer: name, the serving version, platform, inputs and outputs (-1: dynamic)."""
    return {
        "name": manifest.model_name,
        "versions": [manifest.version],
        "platform": PLATFORM,
        "inputs": [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": _shape(s)} for s in manifest.inputs],
        "outputs": [{"name": s.name, "datatype": datatype_of(s.dtype), "shape": _shape(s)} for s in manifest.outputs],
    }


# ------------------------------------------------------------------ inference requests


@dataclass(frozen=True)
class InferRequest:
    """A decoded inference request: ``inputs`` by name, the outputs to return (in order) and, per output,
    whether it goes back as binary data."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...]
    binary: frozenset[str]


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(400, f"{what} must be a JSON object")
    return value


def _params(item: dict[str, Any], what: str) -> dict[str, Any]:
    params = item.get("parameters")
    return {} if params is None else _obj(params, f"{what}.parameters")


def parse_header(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """Split a request body into its JSON object and the binary data after it (empty without the header).

    Raises:
        ProtocolError: 400 for a bad ``Inference-Header-Content-Length`` or malformed JSON.
    """
    view = memoryview(body)
    split = len(body)
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"{HEADER_LENGTH} is not an integer") from None
        if not 0 < split <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} {split} is outside the body of {len(body)} bytes")
    try:
        doc = json.loads(bytes(view[:split]))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(400, f"malformed JSON: {str(exc)[:200]}") from None
    return _obj(doc, "the request"), view[split:]


def _check_shape(name: str, shape: Any, spec: TensorSpec) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise ProtocolError(400, f"input {name}: shape must be a list of integers")
    if any(d < 0 for d in shape):
        raise ProtocolError(400, f"input {name}: negative dimension in shape {shape}")
    want = _shape(spec)
    if len(shape) != len(want) or any(w != -1 and w != d for w, d in zip(want, shape, strict=True)):
        raise ProtocolError(400, f"input {name}: shape {shape} does not fit the model's {want}")
    return tuple(shape)


def _from_json(name: str, data: Any, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if not isinstance(data, list):
        raise ProtocolError(400, f"input {name}: data must be a JSON array")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(400, f"input {name}: data does not fit {dtype}: {str(exc)[:200]}") from None
    if arr.size != math.prod(shape):
        raise ProtocolError(400, f"input {name}: {arr.size} values for shape {list(shape)}")
    return arr.reshape(shape)


def _from_binary(name: str, chunk: memoryview, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    item = np.dtype(dtype).newbyteorder("<")
    if len(chunk) != math.prod(shape) * item.itemsize:
        raise ProtocolError(400, f"input {name}: {len(chunk)} bytes of binary data for shape {list(shape)} {dtype}")
    arr = np.frombuffer(chunk, dtype=item).reshape(shape)
    # Unaligned data (the JSON header's length decides the offset) is copied once; aligned data is used as it is.
    return arr if arr.flags.aligned and item.isnative else arr.astype(dtype)


def decode_infer(doc: dict[str, Any], binary: memoryview, manifest: BundleManifest) -> InferRequest:
    """Check an inference request against the serving model's manifest and build its numpy inputs.

    Every model input must be given once, with the model's datatype, a shape that fits (dynamic
    dimensions take any size), and either ``data`` (flat or nested, row-major) or a
    ``binary_data_size`` parameter (the tensors' bytes follow the JSON header in input order, and
    must use up the body exactly).

    Raises:
        ProtocolError: 400 naming the first problem.
    """
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(400, "id must be a string")
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise ProtocolError(400, "inputs must be a non-empty list")
    specs = {s.name: s for s in manifest.inputs}
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for raw in items:
        item = _obj(raw, "each input")
        name = item.get("name")
        if not isinstance(name, str):
            raise ProtocolError(400, "each input needs a name (a string)")
        spec = specs.get(name)
        if spec is None:
            raise ProtocolError(400, f"the model has no input {name!r} (inputs: {', '.join(specs)})")
        if name in inputs:
            raise ProtocolError(400, f"input {name} given twice")
        datatype = item.get("datatype")
        want = datatype_of(spec.dtype)
        if datatype != want:
            raise ProtocolError(400, f"input {name}: datatype {datatype!r}, the model takes {want}")
        dtype = _TO_NUMPY.get(want)
        if dtype is None:
            raise ProtocolError(400, f"input {name}: datatype {want} is not supported by this endpoint")
        shape = _check_shape(name, item.get("shape"), spec)
        size = _params(item, f"input {name}").get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(400, f"input {name}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise ProtocolError(400, f"input {name}: both data and binary_data_size")
            if offset + size > len(binary):
                raise ProtocolError(400, f"input {name}: binary data ends after the body")
            inputs[name] = _from_binary(name, binary[offset : offset + size], dtype, shape)
            offset += size
        elif "data" in item:
            inputs[name] = _from_json(name, item["data"], dtype, shape)
        else:
            raise ProtocolError(400, f"input {name}: no data and no binary_data_size")
    if offset != len(binary):
        raise ProtocolError(400, f"{len(binary) - offset} bytes of binary data not claimed by any input")
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise ProtocolError(400, f"missing inputs: {', '.join(missing)}")
    return InferRequest(rid, inputs, *_outputs(doc, manifest))


def _outputs(doc: dict[str, Any], manifest: BundleManifest) -> tuple[tuple[str, ...], frozenset[str]]:
    names = [s.name for s in manifest.outputs]
    all_binary = _params(doc, "the request").get("binary_data_output") is True
    asked = doc.get("outputs")
    if asked is None:
        return tuple(names), frozenset(names) if all_binary else frozenset()
    if not isinstance(asked, list):
        raise ProtocolError(400, "outputs must be a list")
    chosen: list[str] = []
    binary: set[str] = set()
    for raw in asked:
        item = _obj(raw, "each output")
        name = item.get("name")
        if not isinstance(name, str) or name not in names:
            raise ProtocolError(400, f"the model has no output {name!r} (outputs: {', '.join(names)})")
        if name not in chosen:
            chosen.append(name)
        flag = _params(item, f"output {name}").get("binary_data")
        if flag is True or (flag is None and all_binary):
            binary.add(name)
    return tuple(chosen), frozenset(binary)


# ------------------------------------------------------------------ inference answers


def encode_infer(
    request: InferRequest,
    outputs: dict[str, np.ndarray],
    *,
    model_name: str,
    model_version: str,
    bundle_sha256: str,
    prediction_id: str,
) -> tuple[bytes, int | None]:
    """The inference answer: (body, JSON header length or None when there is no binary data).

    ``id`` echoes the request's id, or is the prediction id when the request had none;
    ``parameters.prediction_id`` is always the prediction id, ``model_version`` the serving release's
    version and ``parameters.bundle_sha256`` its bundle digest.
    """
    out: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in request.outputs:
        arr = np.asarray(outputs[name])
        entry: dict[str, Any] = {
            "name": name,
            "datatype": _FROM_NUMPY.get(arr.dtype.name, arr.dtype.name.upper()),
            "shape": list(arr.shape),
        }
        if name in request.binary:
            blob = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        out.append(entry)
    doc = {
        "model_name": model_name,
        "model_version": model_version,
        "id": request.id if request.id is not None else prediction_id,
        "parameters": {"prediction_id": prediction_id, "bundle_sha256": bundle_sha256},
        "outputs": out,
    }
    header = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
