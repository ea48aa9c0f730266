"""Adaptive mixed precision (packager.passes.mixed): the search keeps exactly the sensitive nodes in float.

The constructed model is a chain of MatMul+Relu layers on 16 features. In a "sensitive" layer one
weight row is 1000 where every other weight is ~0.3: that row multiplies a feature that is always
0 (so fp32 never sees it), but int8 weight rounding with a scale set by 1000 turns every other
weight of the layer into 0. Only keeping that layer in float repairs it; every other layer
quantizes well.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FAST
from onnx import TensorProto, helper, numpy_helper

from edgeota_contract.manifest import BundleManifest
from edgeota_contract.signing import SigningKey
from packager.api import package_model
from packager.data import load_dataset
from packager.errors import PackagerError
from packager.evaluate import make_session, quality_metrics, run_dataset
from packager.onnx_utils import io_specs, name_nodes, serialize
from packager.passes.base import PassContext, Verdict
from packager.passes.mixed import MixedPrecisionConfig, MixedPrecisionQuantize, int8_weight_share
from packager.passes.quantize import StaticQuantizeConfig
from packager.request import PackageRequest, RequestError

FEATURES = 16


def chain_model(layers: int, sensitive: set[int], seed: int = 0) -> onnx.ModelProto:
    """``layers`` MatMul(+Relu) layers; feature 0 is always 0 (input and every layer's output column 0)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "input"
    for i in range(layers):
        w = rng.normal(0, 0.3, (FEATURES, FEATURES)).astype(np.float32)
        w[:, 0] = 0.0  # output feature 0 stays 0 for the next layer
        if i in sensitive:
            w[0, :] = 1000.0  # multiplies the always-zero feature: harmless in fp32, fatal for int8 rounding
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"mm{i}"], name=f"layer{i}"))
        last = i == layers - 1
        out = "output" if last else f"act{i}"
        if not last:
            nodes.append(helper.make_node("Relu", [f"mm{i}"], [out], name=f"relu{i}"))
        else:
            nodes[-1].output[0] = out
        prev = out
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", FEATURES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def chain_data(path: Path, count: int, seed: int) -> Path:
    x = np.abs(np.random.default_rng(seed).normal(0, 1, (count, FEATURES))).astype(np.float32)
    x[:, 0] = 0.0
    np.savez(path, input=x)
    return path


def _fidelity_judge(model: onnx.ModelProto, data_path: Path) -> Callable[[onnx.ModelProto], Verdict]:
    """A stand-in for the ladder's judge: SQNR against fp32 on the data, passing at 15 dB (full int8 of a chain with a sensitive layer: 0 dB; without it: ~19 dB)."""
    data = load_dataset(data_path, io_specs(model, "input"), "evaluation")
    ref = run_dataset(make_session(serialize(model)), data)

    def judge(candidate: onnx.ModelProto) -> Verdict:
        m = quality_metrics(run_dataset(make_session(serialize(candidate)), data), ref, None)
        return Verdict(m["sqnr_db"] >= 15.0, {"sqnr_db": m["sqnr_db"]}, f"SQNR {m['sqnr_db']:.1f} dB")

    return judge


@pytest.mark.parametrize("sensitive", [{2}, {1, 4}])
def test_search_keeps_exactly_the_sensitive_nodes(tmp_path: Path, sensitive: set[int]) -> None:
    model = name_nodes(chain_model(6, sensitive))
    calib = chain_data(tmp_path / "calib.npz", 64, 1)
    evald = chain_data(tmp_path / "eval.npz", 64, 2)
    ctx = PassContext(tmp_path, load_dataset(calib, io_specs(model, "input"), "calibration"))
    ctx.judge = _fidelity_judge(model, evald)
    step = MixedPrecisionQuantize(MixedPrecisionConfig(static=StaticQuantizeConfig(per_channel=False)))
    out = step.run(model, ctx)
    kept = sorted(step.notes["float_nodes"])
    assert kept == sorted(f"layer{i}" for i in sensitive)
    assert ctx.judge(out).ok
    steps = step.notes["steps"]
    assert steps[0]["k"] == 0 and steps[0]["passed"] is False  # full int8 fails
    assert steps[-1]["passed"] in (True, False) and any(s["passed"] and s["k"] == len(sensitive) for s in steps)
    # The most sensitive node ranks first; a second one downstream can rank low, masked by the first's
    # damage on the full-int8 model: the exponential search overshoots and the greedy prune corrects it.
    assert step.notes["ranking"][0]["node"] in kept
    assert [s["k"] for s in steps][:2] == [0, 1]
    share = step.notes["int8_weight_share"]
    assert share == pytest.approx(1 - len(sensitive) / 6)
    assert step.notes["full_int8_weight_share"] == 1.0 and int8_weight_share(out) == pytest.approx(share)
    assert all(s["seconds"] >= 0 for s in step.extras["steps"]) and "seconds" not in steps[0]


def test_full_int8_passing_stops_at_k0_and_refusal_names_the_measure(tmp_path: Path) -> None:
    calib = chain_data(tmp_path / "calib.npz", 32, 1)
    good = name_nodes(chain_model(4, set()))
    ctx = PassContext(tmp_path / "a", load_dataset(calib, io_specs(good, "input"), "calibration"))
    (tmp_path / "a").mkdir()
    ctx.judge = _fidelity_judge(good, calib)
    step = MixedPrecisionQuantize(MixedPrecisionConfig())
    step.run(good, ctx)
    assert step.notes["float_nodes"] == [] and [s["k"] for s in step.notes["steps"]] == [0]

    bad = name_nodes(chain_model(4, {1}))
    (tmp_path / "b").mkdir()
    ctx = PassContext(tmp_path / "b", load_dataset(calib, io_specs(bad, "input"), "calibration"))
    ctx.judge = lambda _m: Verdict(False, {"sqnr_db": 3.0}, "fidelity_sqnr: SQNR 3.0 dB")  # nothing can pass
    step = MixedPrecisionQuantize(MixedPrecisionConfig(max_float_nodes=2))
    with pytest.raises(PackagerError, match=r"even with 2 nodes in float.*SQNR 3.0 dB"):
        step.run(bad, ctx)
    assert [s["k"] for s in step.notes["steps"]] == [0, 1, 2]  # exponential search up to the cap


def test_fp16_float_nodes_are_refused(tmp_path: Path) -> None:
    model = name_nodes(chain_model(2, set()))
    calib = chain_data(tmp_path / "calib.npz", 8, 1)
    ctx = PassContext(tmp_path, load_dataset(calib, io_specs(model, "input"), "calibration"))
    ctx.judge = lambda _m: Verdict(True, {})
    with pytest.raises(PackagerError, match="fp16 float nodes is not supported"):
        MixedPrecisionQuantize(MixedPrecisionConfig(float_type="fp16")).run(model, ctx)


def test_request_checks_budget_and_output_kinds(tmp_path: Path) -> None:
    base = {"model": "m.onnx", "profiles": ["x86-avx2"], "calibration": "c.npz", "key": "k.pem", "out_dir": "o"}
    assert PackageRequest(**base, mixed_precision_budget_s=30).mixed_precision_budget_s == 30
    with pytest.raises(RequestError, match="mixed_precision_budget_s must be above 0"):
        PackageRequest(**base, mixed_precision_budget_s=0)
    with pytest.raises(RequestError, match="unknown output kind 'boxes'"):
        PackageRequest(**base, output_kinds={"out": "boxes"})


def test_packaging_ships_mixed_precision_and_records_the_search(
    tmp_path: Path, make_profile: Callable[..., Path]
) -> None:
    model_path = tmp_path / "chain.onnx"
    model_path.write_bytes(serialize(chain_model(5, {3})))
    calib = chain_data(tmp_path / "calib.npz", 64, 1)
    evald = chain_data(tmp_path / "eval.npz", 64, 2)
    folder = make_profile(
        "mp", recipes=[{"name": "mp-pt", "precision": "int8", "quantization": {
            "mode": "static", "per_channel": False, "mixed_precision": True}}, "fp32"],
        latency__min_speedup_vs_fp32=None, mixed_precision={"budget_s": 60, "max_float_nodes": 4},
        accuracy__min_sqnr_db=15, accuracy__min_cosine=0.95,
    )  # fmt: skip
    request = PackageRequest(
        model=model_path, profiles=["mp"], profiles_dir=folder, calibration=calib, eval_data=evald,
        key=SigningKey.generate(), out_dir=tmp_path / "out", name="chain", latency=FAST, measure_memory=False,
        gate_overrides={"latency_budget_ms": 1000}, mixed_precision_budget_s=45,
    )  # fmt: skip
    report = package_model(request)
    result = report.results["mp"]
    assert result.ok, result.error
    assert result.recipe == "mp-pt" and result.output_kinds == {"output": "class_scores"}  # [N, 16]: inferred
    mp = result.mixed_precision
    assert mp is not None and mp["float_nodes"] == ["layer3"] and mp["fp32_model_bytes"] > mp["model_bytes"]
    assert mp["int8_weight_share"] == pytest.approx(0.8) and mp["full_int8_model_bytes"] < mp["model_bytes"]
    assert mp["steps"][0]["k"] == 0 and not mp["steps"][0]["passed"] and mp["full_int8_latency_p50_ms"] > 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["results"]["mp"]["mixed_precision"]["float_nodes"] == ["layer3"]
    with tarfile.open(result.bundle_path) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = BundleManifest.parse(member.read())
    record = next(p for p in manifest.passes if p.name == "quantize_mixed_precision")
    assert record.config["budget_s"] == 45 and record.config["result"]["float_nodes"] == ["layer3"]
    assert all("seconds" not in s for s in record.config["result"]["steps"])


def test_profile_mixed_precision_settings(make_profile: Callable[..., Path]) -> None:
    from packager.errors import ProfileError
    from packager.profiles import load_profile

    folder = make_profile("bad", mixed_precision={"float_type": "fp16"})  # x86-avx2 does not allow fp16
    with pytest.raises(ProfileError, match="float_type fp16 needs fp16 in allowed_precisions"):
        load_profile("bad", folder)
    make_profile("neg", mixed_precision={"budget_s": 0})
    with pytest.raises(ProfileError, match=r"mixed_precision\.budget_s"):
        load_profile("neg", folder)
    ok = load_profile("rpi5-fp16", make_profile("rpi5-fp16", base="rpi5", mixed_precision={"float_type": "fp16"}))
    assert ok.mixed_precision.float_type == "fp16"
    assert "int8-qdq-mixed" in [r.name for r in load_profile("rpi4").ladder]


def test_silero_vad_keeps_a_few_nodes_float_where_full_int8_fails(tmp_path: Path) -> None:
    """A real model: int8 on every op of silero-vad breaks fidelity (its STFT front-end); the search repairs it."""
    pytest.importorskip("silero_vad", reason="the silero-vad wheel is not installed")
    from packager.examples.silero import build_silero_example

    example = build_silero_example(tmp_path / "vad", "static", calibration_chunks=48, eval_chunks=100)
    report = package_model(
        PackageRequest(
            model=example.model_path, profiles=["x86-avx2"], calibration=example.calibration_path,
            eval_data=example.eval_path, key=SigningKey.generate(), out_dir=tmp_path / "out", name="vad",
            recipes=["int8-qdq", "int8-qdq-mixed"], latency=FAST, measure_memory=False,
            gate_overrides={"latency_budget_ms": 1000},
        )
    )  # fmt: skip
    result = report.results["x86-avx2"]
    full, mixed = result.attempts
    assert not full.passed_gates and "fidelity" in (full.reason or "")
    assert mixed.search is not None and mixed.search["steps"][0]["k"] == 0 and not mixed.search["steps"][0]["passed"]
    if mixed.passed_gates:  # the speed-up gate depends on the host; quality must hold either way
        assert result.ok and result.recipe == "int8-qdq-mixed"
    floats = mixed.search["float_nodes"]
    assert 0 < len(floats) <= 8 and any("stft" in n for n in floats)
    assert {g.name: g.ok for g in mixed.gates if g.name.startswith("fidelity")} == {
        "fidelity_top1": True,
        "fidelity_cosine": True,
        "fidelity_sqnr": True,
    }
