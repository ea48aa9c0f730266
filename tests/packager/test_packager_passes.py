"""Passes one by one: loading checks, quantization variants, pruning, op-support check, data checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from packager.data import Dataset, check_dataset, load_dataset, make_reader
from packager.errors import DataError, ModelInputError
from packager.evaluate import make_session, quality_metrics, run_dataset
from packager.examples.digits import DigitsExample
from packager.onnx_utils import io_specs, load_onnx_file, op_types, serialize
from packager.passes.base import PassContext
from packager.passes.check import OpSupportConfig, op_support_problems
from packager.passes.prune import MagnitudePrune, MagnitudePruneConfig
from packager.passes.quantize import DynamicQuantize, DynamicQuantizeConfig, StaticQuantize, StaticQuantizeConfig
from packager.passes.weights import ConvertFp16, Fp16Config, Int4WeightOnly, Int4WeightOnlyConfig


@pytest.fixture
def loaded(mlp: DigitsExample) -> tuple[onnx.ModelProto, Dataset, Dataset]:
    model, _ = load_onnx_file(mlp.model_path)
    specs = io_specs(model)
    return model, load_dataset(mlp.calibration_path, specs), load_dataset(mlp.eval_path, specs, "evaluation")


def _ctx(tmp_path: Path, calib: Dataset) -> PassContext:
    return PassContext(tmp_path, calib)


def _ops(model: onnx.ModelProto) -> set[str]:
    return {op for _, op in op_types(model)}


def _fidelity(model: onnx.ModelProto, ref: onnx.ModelProto, data: Dataset) -> dict[str, float]:
    out = run_dataset(make_session(serialize(model)), data)
    base = run_dataset(make_session(serialize(ref)), data)
    return quality_metrics(out, base, data.labels)


def test_corrupt_and_truncated_onnx(mlp: DigitsExample, tmp_path: Path) -> None:
    data = mlp.model_path.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.onnx").write_bytes(b"\x00garbage" * 50)
    (tmp_path / "empty.onnx").write_bytes(b"")
    for name in ("trunc.onnx", "junk.onnx"):
        with pytest.raises(ModelInputError, match=r"corrupt or truncated|not an ONNX model|fails the ONNX checker"):
            load_onnx_file(tmp_path / name)
    with pytest.raises(ModelInputError, match="empty"):
        load_onnx_file(tmp_path / "empty.onnx")
    with pytest.raises(ModelInputError, match="does not exist"):
        load_onnx_file(tmp_path / "missing.onnx")


def test_static_qdq_and_qoperator(loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, calib, ev = loaded
    qdq = StaticQuantize(StaticQuantizeConfig(format="qdq", calibration_samples=64)).run(model, _ctx(tmp_path, calib))
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(qdq)
    assert _fidelity(qdq, model, ev)["top1_agreement"] > 0.97
    qop = StaticQuantize(StaticQuantizeConfig(format="qoperator", calibration="entropy", calibration_samples=64)).run(
        model, _ctx(tmp_path / "q", calib)
    )
    assert any(op.startswith("QLinear") or op == "QGemm" for op in _ops(qop))
    assert "DequantizeLinear" in _ops(qop)  # only at the graph output
    pct = StaticQuantize(StaticQuantizeConfig(calibration="percentile", calibration_samples=32)).run(
        model, _ctx(tmp_path / "p", calib)
    )
    assert _fidelity(pct, model, ev)["cosine_mean"] > 0.95


def test_exclusion_keeps_worst_nodes_in_float(loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, calib, _ = loaded
    qpass = StaticQuantize(StaticQuantizeConfig(exclude_top_k=1, calibration_samples=32, analysis_samples=16))
    out = qpass.run(model, _ctx(tmp_path, calib))
    excluded = qpass.notes["excluded_nodes"]
    assert len(excluded) == 1 and excluded[0].startswith("fc")
    node = next(n for n in out.graph.node if n.name == excluded[0])
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    # the weight of an excluded Gemm is the original float initializer, not a DequantizeLinear output
    assert producers.get(node.input[1]) != "DequantizeLinear"
    assert qpass.record().config["result"]["excluded_nodes"] == excluded


def test_calibration_is_capped(loaded) -> None:  # type: ignore[no-untyped-def]
    _, calib, _ = loaded
    reader = make_reader(calib, cap=50, batch=16)
    seen = 0
    while (batch := reader.get_next()) is not None:
        seen += len(batch["input"])
    assert seen == 50 and len(reader) == 4


def test_dynamic_fp16_int4(loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, calib, ev = loaded
    dyn = DynamicQuantize(DynamicQuantizeConfig()).run(model, _ctx(tmp_path, calib))
    assert "DynamicQuantizeLinear" in _ops(dyn) or "MatMulInteger" in _ops(dyn)
    fp16 = ConvertFp16(Fp16Config()).run(model, _ctx(tmp_path, calib))
    assert any(i.data_type == TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert io_specs(fp16)[0].dtype == "float32"  # graph inputs stay fp32
    assert _fidelity(fp16, model, ev)["cosine_mean"] > 0.9999
    int4 = Int4WeightOnly(Int4WeightOnlyConfig(block_size=16)).run(model, _ctx(tmp_path, calib))
    assert any(i.data_type == TensorProto.INT4 for i in int4.graph.initializer)
    assert len(serialize(int4)) < 0.4 * len(serialize(model))
    assert _fidelity(int4, model, ev)["top1_agreement"] > 0.95


def test_magnitude_pruning(loaded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, calib, _ = loaded
    prune = MagnitudePrune(MagnitudePruneConfig(sparsity=0.5, min_params=100))
    out = prune.run(model, _ctx(tmp_path, calib))
    w = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name == "fc0.weight"))
    assert 0.49 <= float((w == 0).mean()) <= 0.52
    assert prune.notes["weights_zeroed"] > 0
    # the source model is untouched
    w0 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc0.weight"))
    assert float((w0 == 0).mean()) < 0.01


def test_op_support_check() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    then_g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])],
        "t",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    cond = helper.make_tensor_value_info("c", TensorProto.BOOL, [])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=then_g),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x, cond], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    cfg = OpSupportConfig(
        profile="t",
        opset_min=13,
        opset_max=16,
        static_only=True,
        allow_control_flow=False,
        allow=["Relu", "If"],
        deny=[],
    )
    problems = op_support_problems(model, cfg)
    text = " | ".join(problems)
    assert "opset 17 outside" in text
    assert "control flow op If" in text
    assert "Identity is not in the profile's allow list" in text
    assert "dynamic shape" in text
    ok_cfg = OpSupportConfig(
        profile="t", opset_min=13, opset_max=21, static_only=False, allow_control_flow=True, allow=None, deny=["Relu"]
    )
    assert op_support_problems(model, ok_cfg) == ["op Relu is denied"]


def test_data_checks(mlp: DigitsExample) -> None:
    model, _ = load_onnx_file(mlp.model_path)
    specs = io_specs(model)
    x = np.zeros((10, 64), np.float32)
    with pytest.raises(DataError, match="lacks model input 'input' \\(it has: x\\)"):
        check_dataset({"x": x}, specs)
    with pytest.raises(DataError, match=r"has shape \(10, 63\) but the model expects \[N, 64\]"):
        check_dataset({"input": np.zeros((10, 63), np.float32)}, specs)
    with pytest.raises(DataError, match="expects rank 2"):
        check_dataset({"input": np.zeros((10, 8, 8), np.float32)}, specs)
    with pytest.raises(DataError, match="9 labels for 10 samples"):
        check_dataset({"input": x, "labels": np.zeros(9, np.int64)}, specs)
    with pytest.raises(DataError, match="expects float32"):
        check_dataset({"input": np.array([["a"] * 64] * 10)}, specs)
    ok = check_dataset({"input": x.astype(np.float64), "labels": np.zeros(10, np.int32)}, specs)
    assert ok.inputs["input"].dtype == np.float32 and ok.labels is not None and ok.labels.dtype == np.int64
