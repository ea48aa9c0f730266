"""Weight-format passes that are not integer quantization of activations: fp16 and int4 weight-only."""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from packager.onnx_utils import main_opset, name_nodes
from packager.passes.base import Pass, PassConfig, PassContext, PassFailed


class Fp16Config(PassConfig):
    keep_io_types: bool = True
    implementation: Literal["onnxruntime.transformers.float16"] = "onnxruntime.transformers.float16"


class ConvertFp16(Pass[Fp16Config]):
    """fp16 weights and compute with ORT's converter; graph inputs/outputs stay fp32 (Casts added)."""

    name = "convert_fp16"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        import warnings

        from onnxruntime.transformers.float16 import convert_float_to_float16

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = convert_float_to_float16(copy, keep_io_types=self.config.keep_io_types, disable_shape_infer=False)
        except Exception as exc:
            raise PassFailed(f"fp16 conversion failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return out  # type: ignore[no-any-return]


class Int4WeightOnlyConfig(PassConfig):
    block_size: int = Field(default=32, ge=16, le=256)
    min_params: int = Field(default=256, ge=0)
    symmetric: bool = True


class Int4WeightOnly(Pass[Int4WeightOnlyConfig]):
    """Block-wise symmetric int4 weights for MatMul/Gemm, dequantized in-graph (DequantizeLinear, opset 21).

    Compute stays fp32; only the stored weights shrink (about 1/8 of fp32 plus one fp32 scale per
    block). Needs opset >= 21 (blocked DequantizeLinear); the model is converted when it is older.
    """

    name = "quantize_int4_weight_only"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnx import version_converter

        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
        if main_opset(model) < 21:
            try:
                model = version_converter.convert_version(model, 21)
            except Exception as exc:
                raise PassFailed(f"int4 weight-only needs opset 21; conversion failed: {exc}") from exc
        model = name_nodes(model)
        inits = {init.name: init for init in model.graph.initializer}
        uses: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
        bs = self.config.block_size
        new_nodes: list[onnx.NodeProto] = []
        converted = 0
        for node in model.graph.node:
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
                new_nodes.append(node)
                continue
            wname = node.input[1]
            init = inits.get(wname)
            if init is None or uses.get(wname, 0) != 1 or init.data_type != TensorProto.FLOAT:
                new_nodes.append(node)
                continue
            w = numpy_helper.to_array(init)
            if w.ndim != 2 or w.size < self.config.min_params:
                new_nodes.append(node)
                continue
            trans_b = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
            axis = 1 if trans_b else 0  # the reduction (K) axis of B
            q, scale = _int4_blockwise(w, axis, bs)
            qname, sname, dqout = f"{wname}_int4", f"{wname}_int4_scale", f"{wname}_int4_dq"
            model.graph.initializer.remove(init)
            model.graph.initializer.extend(
                [
                    helper.make_tensor(qname, TensorProto.INT4, q.shape, q.flatten().tolist()),
                    numpy_helper.from_array(scale.astype(np.float32), sname),
                ]
            )
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [qname, sname], [dqout], name=f"{node.name}_w_dq", axis=axis, block_size=bs
                )
            )
            node.input[1] = dqout
            new_nodes.append(node)
            converted += 1
        if converted == 0:
            raise PassFailed("int4 weight-only: no MatMul/Gemm with a constant fp32 weight to quantize")
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        self.notes["weights_quantized"] = converted
        return model


def _int4_blockwise(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    moved = np.moveaxis(w, axis, 0)  # [K, N]
    k = moved.shape[0]
    blocks = -(-k // block)
    pad = blocks * block - k
    padded = np.pad(moved, ((0, pad), (0, 0))) if pad else moved
    grouped = padded.reshape(blocks, block, -1)
    scale = np.abs(grouped).max(axis=1) / 7.0  # [blocks, N]
    scale[scale == 0] = 1.0
    q = np.clip(np.round(grouped / scale[:, None, :]), -8, 7).astype(np.int8).reshape(blocks * block, -1)[:k]
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)
