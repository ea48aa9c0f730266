"""The Open Inference Protocol codec and routing (device_agent.serving.oip): pure functions, every rejection."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from device_agent.serving import oip
from edgeota_contract.manifest import BundleManifest, TensorSpec

_FIELDS: dict[str, Any] = {
    "model_name": "digits",
    "version": "1.2.0",
    "inputs": [
        TensorSpec(name="x", dtype="float32", shape=[None, 64]),
        TensorSpec(name="k", dtype="int64", shape=["batch", 2]),
    ],
    "outputs": [
        TensorSpec(name="y", dtype="float", shape=[None, 10]),
        TensorSpec(name="z", dtype="int64", shape=[None]),
    ],
}
MANIFEST = BundleManifest.model_construct(**_FIELDS)  # only names, versions and tensors are read


def _good(n: int = 1) -> dict[str, Any]:
    return {
        "inputs": [
            {"name": "x", "shape": [n, 64], "datatype": "FP32", "data": [0.5] * (64 * n)},
            {"name": "k", "shape": [n, 2], "datatype": "INT64", "data": [[1, 2]] * n},
        ]
    }


def _decode(doc: Any, binary: bytes = b"") -> oip.InferRequest:
    return oip.decode_infer(doc, memoryview(binary), MANIFEST)


# ------------------------------------------------------------------ routing


@pytest.mark.parametrize(
    ("method", "path", "endpoint", "model", "version"),
    [
        ("GET", "/v2", "server", None, None),
        ("GET", "/v2/health/live", "live", None, None),
        ("HEAD", "/v2/health/ready", "ready", None, None),
        ("GET", "/v2/models/digits", "model", "digits", None),
        ("GET", "/v2/models/digits/versions/1.2.0/ready", "model_ready", "digits", "1.2.0"),
        ("POST", "/v2/models/digits/infer?x=1", "infer", "digits", None),
        ("POST", "/v2/models/digits/versions/1.2.0/infer", "infer", "digits", "1.2.0"),
    ],
)
def test_routes(method: str, path: str, endpoint: str, model: str | None, version: str | None) -> None:
    assert oip.route(method, path) == oip.Route(endpoint, model, version)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/", 404),
        ("GET", "/v2/models", 404),
        ("GET", "/v2/models/digits/stats", 404),
        ("GET", "/v1/models/digits", 404),
        ("GET", "/v2/models/digits/infer", 405),
        ("POST", "/v2/health/live", 405),
        ("DELETE", "/v2/models/digits", 405),
    ],
)
def test_route_rejections(method: str, path: str, status: int) -> None:
    with pytest.raises(oip.ProtocolError) as err:
        oip.route(method, path)
    assert err.value.status == status
    if status == 405:
        assert err.value.allow in ("GET", "POST")


# ------------------------------------------------------------------ metadata


def test_model_metadata_from_the_manifest() -> None:
    meta = oip.model_metadata(MANIFEST)
    assert meta == {
        "name": "digits",
        "versions": ["1.2.0"],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, 64]},
            {"name": "k", "datatype": "INT64", "shape": [-1, 2]},
        ],
        "outputs": [
            {"name": "y", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "z", "datatype": "INT64", "shape": [-1]},
        ],
    }


# ------------------------------------------------------------------ requests


def test_decodes_json_flat_and_nested() -> None:
    req = _decode({**_good(2), "id": "r1"})
    assert req.id == "r1" and req.outputs == ("y", "z") and req.binary == frozenset()
    assert req.inputs["x"].shape == (2, 64) and req.inputs["x"].dtype == np.float32
    assert req.inputs["k"].tolist() == [[1, 2], [1, 2]] and req.inputs["k"].dtype == np.int64


def test_decodes_binary_inputs_after_the_header() -> None:
    x = np.arange(128, dtype=np.float32).reshape(2, 64)
    k = np.array([[3, 4], [5, 6]], dtype=np.int64)
    doc = {
        "inputs": [
            {"name": "x", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
            {"name": "k", "shape": [2, 2], "datatype": "INT64", "parameters": {"binary_data_size": k.nbytes}},
        ],
        "outputs": [{"name": "z", "parameters": {"binary_data": True}}, {"name": "y"}],
    }
    header = json.dumps(doc).encode()
    parsed, binary = oip.parse_header(header + x.tobytes() + k.tobytes(), str(len(header)))
    req = oip.decode_infer(parsed, binary, MANIFEST)
    assert np.array_equal(req.inputs["x"], x) and np.array_equal(req.inputs["k"], k)
    assert req.outputs == ("z", "y") and req.binary == frozenset({"z"})


def test_binary_data_output_applies_to_every_output_unless_one_says_otherwise() -> None:
    doc = {**_good(), "parameters": {"binary_data_output": True}}
    assert _decode(doc).binary == frozenset({"y", "z"})
    doc["outputs"] = [{"name": "y", "parameters": {"binary_data": False}}, {"name": "z"}]
    assert _decode(doc).binary == frozenset({"z"})


BAD: list[tuple[str, Any, str]] = [
    ("not an object", [1], "must be a JSON object"),
    ("no inputs", {"inputs": []}, "non-empty list"),
    ("id not a string", {**_good(), "id": 5}, "id must be a string"),
    ("input not an object", {"inputs": ["x"]}, "each input must be a JSON object"),
    ("input without name", {"inputs": [{"shape": [1, 64]}]}, "needs a name"),
    ("unknown input", {"inputs": [{"name": "q", "shape": [1], "datatype": "FP32", "data": [1]}]}, "no input 'q'"),
    ("duplicate input", {"inputs": [_good()["inputs"][0]] * 2}, "given twice"),
    ("wrong datatype", {"inputs": [{**_good()["inputs"][0], "datatype": "FP64"}]}, "the model takes FP32"),
    ("wrong rank", {"inputs": [{**_good()["inputs"][0], "shape": [64]}]}, "does not fit"),
    ("wrong fixed dim", {"inputs": [{**_good()["inputs"][0], "shape": [1, 63]}]}, "does not fit"),
    ("negative dim", {"inputs": [{**_good()["inputs"][0], "shape": [-1, 64]}]}, "negative dimension"),
    ("shape not ints", {"inputs": [{**_good()["inputs"][0], "shape": [1.0, 64]}]}, "list of integers"),
    ("shape bools", {"inputs": [{**_good()["inputs"][0], "shape": [True, 64]}]}, "list of integers"),
    ("too few values", {"inputs": [{**_good()["inputs"][0], "data": [0.5] * 63}]}, "63 values"),
    ("data not a list", {"inputs": [{**_good()["inputs"][0], "data": "abc"}]}, "JSON array"),
    ("data not numbers", {"inputs": [{**_good()["inputs"][0], "data": ["a"] * 64}]}, "does not fit float32"),
    ("ragged data", {"inputs": [{**_good()["inputs"][1], "data": [[1, 2], [3]]}]}, "does not fit int64"),
    ("no data", {"inputs": [{k: v for k, v in _good()["inputs"][0].items() if k != "data"}]}, "no data"),
    ("missing input", {"inputs": [_good()["inputs"][0]]}, "missing inputs: k"),
    ("unknown output", {**_good(), "outputs": [{"name": "w"}]}, "no output 'w'"),
    ("outputs not a list", {**_good(), "outputs": {"name": "y"}}, "outputs must be a list"),
    ("parameters not an object", {**_good(), "parameters": [1]}, "parameters must be a JSON object"),
    (
        "binary size and data",
        {"inputs": [{**_good()["inputs"][0], "parameters": {"binary_data_size": 256}}]},
        "both data and",
    ),
    (
        "binary size negative",
        {
            "inputs": [
                {
                    **{k: v for k, v in _good()["inputs"][0].items() if k != "data"},
                    "parameters": {"binary_data_size": -1},
                }
            ]
        },
        "non-negative integer",
    ),
    (
        "binary past the body",
        {
            "inputs": [
                {
                    **{k: v for k, v in _good()["inputs"][0].items() if k != "data"},
                    "parameters": {"binary_data_size": 256},
                }
            ]
        },
        "ends after the body",
    ),
]


@pytest.mark.parametrize(("what", "doc", "message"), BAD, ids=[b[0] for b in BAD])
def test_rejections_are_400_with_a_message(what: str, doc: Any, message: str) -> None:
    with pytest.raises(oip.ProtocolError) as err:
        if isinstance(doc, dict):
            _decode(doc)
        else:
            oip.parse_header(json.dumps(doc).encode(), None)
    assert err.value.status == 400
    assert message in str(err.value), str(err.value)


def test_binary_size_must_match_the_shape_and_use_up_the_body() -> None:
    spec = {"name": "x", "shape": [1, 64], "datatype": "FP32"}
    k = _good()["inputs"][1]
    doc = {"inputs": [{**spec, "parameters": {"binary_data_size": 255}}, k]}
    with pytest.raises(oip.ProtocolError, match="255 bytes"):
        _decode(doc, b"\0" * 255)
    doc = {"inputs": [{**spec, "parameters": {"binary_data_size": 256}}, k]}
    with pytest.raises(oip.ProtocolError, match="4 bytes of binary data not claimed"):
        _decode(doc, b"\0" * 260)
    assert _decode(doc, b"\0" * 256).inputs["x"].shape == (1, 64)


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{bad json", None, "malformed JSON"),
        (b"\xff\xfe", None, "malformed JSON"),
        (b"[" * 100_000, None, "malformed JSON"),
        (b"{}", "abc", "not an integer"),
        (b"{}", "0", "outside the body"),
        (b"{}", "3", "outside the body"),
        (b"{}", "-1", "outside the body"),
    ],
)
def test_parse_header_rejections(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(oip.ProtocolError, match=message) as err:
        oip.parse_header(body, length)
    assert err.value.status == 400


def test_unaligned_binary_data_is_copied_aligned() -> None:
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    k = np.array([[1, 2]], dtype=np.int64)
    header = b'{"inputs":[{"name":"x","shape":[1,64],"datatype":"FP32","parameters":{"binary_data_size":256}},' + (
        b'{"name":"k","shape":[1,2],"datatype":"INT64","parameters":{"binary_data_size":16}}]}  '
    )
    assert len(header) % 4 != 0 or len(header) % 8 != 0
    doc, binary = oip.parse_header(header + x.tobytes() + k.tobytes(), str(len(header)))
    req = oip.decode_infer(doc, binary, MANIFEST)
    assert req.inputs["x"].flags.aligned and np.array_equal(req.inputs["x"], x)
    assert req.inputs["k"].flags.aligned and np.array_equal(req.inputs["k"], k)


# ------------------------------------------------------------------ answers


def test_encode_json_answer_names_prediction_and_release() -> None:
    req = _decode(_good())
    outputs: dict[str, np.ndarray] = {"y": np.full((1, 10), 0.25, dtype=np.float32), "z": np.array([7], dtype=np.int64)}
    body, header = oip.encode_infer(
        req, outputs, model_name="digits", model_version="1.2.0", bundle_sha256="c" * 64, prediction_id="p" * 32
    )
    assert header is None
    doc = json.loads(body)
    assert doc["id"] == "p" * 32  # no request id: the prediction id
    assert doc["model_version"] == "1.2.0" and doc["parameters"] == {
        "prediction_id": "p" * 32,
        "bundle_sha256": "c" * 64,
    }
    assert doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 10], "data": [0.25] * 10},
        {"name": "z", "datatype": "INT64", "shape": [1], "data": [7]},
    ]


def test_encode_binary_answer() -> None:
    req = _decode({**_good(), "id": "abc", "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    y = np.arange(10, dtype=np.float32).reshape(1, 10)
    body, header = oip.encode_infer(
        req,
        {"y": y, "z": np.zeros(1, np.int64)},
        model_name="digits",
        model_version="1.2.0",
        bundle_sha256="c" * 64,
        prediction_id="q" * 32,
    )
    assert header is not None
    doc = json.loads(body[:header])
    assert doc["id"] == "abc" and doc["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 10], "parameters": {"binary_data_size": 40}}
    ]
    assert np.array_equal(np.frombuffer(body[header:], dtype="<f4").reshape(1, 10), y)


def test_datatype_names() -> None:
    assert [oip.datatype_of(d) for d in ("float32", "float", "double", "half", "int64", "uint8", "bool", "string")] == [
        "FP32",
        "FP32",
        "FP64",
        "FP16",
        "INT64",
        "UINT8",
        "BOOL",
        "BYTES",
    ]
    assert json.loads(oip.error_body("nope")) == {"error": "nope"}
