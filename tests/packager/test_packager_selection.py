"""Choosing among passing attempts (selection: best), byte stripping in finalize, calibration batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from packager.data import check_dataset
from packager.examples.digits import DigitsExample
from packager.onnx_utils import io_specs
from packager.passes.base import PassContext
from packager.passes.graph import Finalize, FinalizeConfig
from packager.passes.quantize import StaticQuantize, StaticQuantizeConfig, even_batch, kept_float_nodes
from packager.selection import Attempt, pick_best


def _attempt(name: str, acc: float, speedup: float, size: float) -> Attempt:
    return Attempt(
        name, False, passed_gates=True, metrics={"accuracy": acc, "host_speedup_vs_fp32": speedup, "model_bytes": size}
    )


def test_pick_best_prefers_speed_then_quality_within_noise() -> None:
    cands = [
        _attempt("slow-accurate", 0.99, 1.50, 100),
        _attempt("fast", 0.97, 1.90, 100),
        _attempt("fast-accurate", 0.98, 1.88, 100),  # within 3% of the fastest and more accurate: wins
        _attempt("dominated", 0.97, 1.80, 120),
    ]
    index, why = pick_best(cands, "accuracy")
    assert cands[index].recipe == "fast-accurate" and "4 passing attempts" in why
    # equal on quality and speed: the smaller one
    index, _ = pick_best([_attempt("big", 0.98, 1.9, 200), _attempt("small", 0.98, 1.9, 150)], "accuracy")
    assert index == 1
    # clearly faster beats more accurate (outside the tolerance)
    index, _ = pick_best([_attempt("accurate", 0.99, 1.2, 100), _attempt("fast", 0.98, 1.9, 100)], "accuracy")
    assert index == 1
    # without labels quality is SQNR
    a = Attempt("a", False, passed_gates=True, metrics={"sqnr_db": 30.0, "host_speedup_vs_fp32": 1.2, "model_bytes": 9})
    b = Attempt("b", False, passed_gates=True, metrics={"sqnr_db": 20.0, "host_speedup_vs_fp32": 1.2, "model_bytes": 9})
    assert pick_best([b, a], "fidelity")[0] == 1
    with pytest.raises(ValueError):
        pick_best([], "accuracy")


def test_even_batch() -> None:
    assert even_batch(200, 32) == 25 and even_batch(256, 32) == 32 and even_batch(7, 32) == 7 and even_batch(13, 4) == 1


def test_finalize_strips_bytes_not_numerics(cnn: DigitsExample, tmp_path: Path) -> None:
    model = onnx.load(str(cnn.model_path))
    specs = io_specs(model)
    calib = check_dataset(dict(np.load(cnn.calibration_path)), specs)
    quantized = StaticQuantize(StaticQuantizeConfig(per_channel=False, keep_float=["first"])).run(
        model, PassContext(tmp_path, calib, lambda _m: None)
    )
    stem = kept_float_nodes(model, ["first"])
    assert len(stem) == 1 and next(n for n in quantized.graph.node if n.name == stem[0]).op_type == "Conv"
    fin = Finalize(FinalizeConfig())
    slim = fin.run(quantized, PassContext(tmp_path, None, lambda _m: None))
    before, after = quantized.SerializeToString(), slim.SerializeToString()
    assert len(after) < len(before) and fin.notes["bytes_saved"] == len(before) - len(after) > 1000
    assert [i.name for i in slim.graph.input] == [i.name for i in quantized.graph.input]
    assert [o.name for o in slim.graph.output] == [o.name for o in quantized.graph.output]
    assert all(not n.name for n in slim.graph.node) and not slim.metadata_props
    x = np.load(cnn.eval_path)["input"][:64]
    run = [
        ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0] for b in (before, after)
    ]
    np.testing.assert_array_equal(run[0], run[1])
    onnx.checker.check_model(slim)
