"""Quantization passes on ONNX Runtime's quantization tool: static (QDQ / QOperator), dynamic,
fp16 and int4 weight-only.

Static quantization streams at most ``calibration_samples`` samples through a
:class:`~packager.data.CappedReader`. With ``exclude_top_k > 0`` (QDQ only) it first quantizes
everything, compares fp32 and quantized activations on a few calibration samples
(``onnxruntime.quantization.qdq_loss_debug``), and re-quantizes keeping in float the nodes whose
outputs lose the most (lowest SQNR of their quantize-dequantize round trip).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from pydantic import Field

from packager.onnx_utils import main_opset
from packager.passes.base import Pass, PassConfig, PassContext, PassFailed

QuantTypeName = Literal["int8", "uint8", "int16", "uint16"]


def _quant_type(name: str):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import QuantType

    return {
        "int8": QuantType.QInt8,
        "uint8": QuantType.QUInt8,
        "int16": QuantType.QInt16,
        "uint16": QuantType.QUInt16,
    }[name]


def _calib_method(name: str):  # type: ignore[no-untyped-def]
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


class _DropOrtQuantizerLogs(logging.Filter):
    """ORT's quantizer logs advice through the root logger; keep it out of our users' logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname


_ORT_FILTER = _DropOrtQuantizerLogs()
_STDOUT_LOCK = threading.Lock()


def _quiet_ort_logs() -> None:
    root = logging.getLogger()
    if _ORT_FILTER not in root.filters:
        root.addFilter(_ORT_FILTER)  # only drops records logged from onnxruntime's own files


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))
    return path


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every unnamed node a deterministic unique name (quantizer exclusions refer to names)."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)
    return model


class StaticQuantizeConfig(PassConfig):
    format: Literal["qdq", "qoperator"] = "qdq"
    per_channel: bool = True
    activation_type: QuantTypeName = "uint8"
    weight_type: QuantTypeName = "int8"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    calibration_samples: int = Field(default=256, ge=1)
    calibration_batch: int = Field(default=32, ge=1)
    percentile: float = 99.999
    reduce_range: bool = False
    op_types: list[str] | None = None
    exclude_top_k: int = Field(default=0, ge=0)
    analysis_samples: int = Field(default=32, ge=1)


class StaticQuantize(Pass[StaticQuantizeConfig]):
    name = "quantize_static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if ctx.calibration is None:
            raise PassFailed("static quantization needs calibration data")
        src = _save(name_nodes(_copy(model)), ctx.work_dir / "static_in.onnx")
        excluded: list[str] = []
        if self.config.exclude_top_k > 0:
            if self.config.format != "qdq":
                raise PassFailed("node exclusion by activation error needs the QDQ format")
            first = self._quantize(src, ctx, ctx.work_dir / "static_probe.onnx", [])
            excluded = self._worst_nodes(src, first, ctx)
            self.notes["excluded_nodes"] = excluded
            ctx.log(f"keeping in float: {', '.join(excluded) or 'nothing'}")
        out = self._quantize(src, ctx, ctx.work_dir / "static_out.onnx", excluded)
        return onnx.load(str(out))

    def _quantize(self, src: Path, ctx: PassContext, dst: Path, exclude: list[str]) -> Path:
        from onnxruntime.quantization import QuantFormat, quantize_static

        from packager.data import make_reader

        _quiet_ort_logs()
        cfg = self.config
        reader = make_reader(ctx.calibration, cfg.calibration_samples, cfg.calibration_batch)
        extra = {
            "CalibMaxIntermediateOutputs": 16,  # flush collected activations every 16 batches
            "CalibPercentile": cfg.percentile,
            "WeightSymmetric": True,
            "ActivationSymmetric": cfg.activation_type in ("int8", "int16"),
        }
        if cfg.activation_type in ("int16", "uint16") or cfg.weight_type in ("int16", "uint16"):
            extra["UseQDQContribOps"] = main_opset(onnx.load(str(src))) < 21
        try:
            # ORT's calibrators print progress; redirecting stdout is process-wide, so one at a time.
            with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(src),
                    str(dst),
                    reader,
                    quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                    op_types_to_quantize=cfg.op_types,
                    per_channel=cfg.per_channel,
                    reduce_range=cfg.reduce_range,
                    activation_type=_quant_type(cfg.activation_type),
                    weight_type=_quant_type(cfg.weight_type),
                    nodes_to_exclude=exclude or None,
                    calibrate_method=_calib_method(cfg.calibration),
                    extra_options=extra,
                )
        except Exception as exc:
            raise PassFailed(f"static quantization failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return dst

    def _worst_nodes(self, float_path: Path, qdq_path: Path, ctx: PassContext) -> list[str]:
        from onnxruntime.quantization import qdq_loss_debug as dbg

        from packager.data import make_reader

        float_aug = ctx.work_dir / "float_aug.onnx"
        qdq_aug = ctx.work_dir / "qdq_aug.onnx"
        dbg.modify_model_output_intermediate_tensors(str(float_path), str(float_aug))
        dbg.modify_model_output_intermediate_tensors(str(qdq_path), str(qdq_aug))
        n = self.config.analysis_samples
        batch = self.config.calibration_batch
        float_acts = dbg.collect_activations(str(float_aug), make_reader(ctx.calibration, n, batch))
        qdq_acts = dbg.collect_activations(str(qdq_aug), make_reader(ctx.calibration, n, batch))
        matching = dbg.create_activation_matching(qdq_acts, float_acts)
        errors = dbg.compute_activation_error(matching)
        nodes = onnx.load(str(float_path)).graph.node
        producer = {out: node for node in nodes for out in node.output}
        scored: list[tuple[float, str]] = []
        for tensor, err in errors.items():
            node = _compute_producer(tensor, producer)
            sqnr = err.get("qdq_err")
            if node is None or sqnr is None or not np.isfinite(sqnr):
                continue
            scored.append((float(sqnr), node))
        scored.sort()
        worst: list[str] = []
        for _, node in scored:
            if node not in worst:
                worst.append(node)
            if len(worst) == self.config.exclude_top_k:
                break
        self.notes["sqnr_db"] = {node: round(s, 2) for s, node in scored[: max(4, self.config.exclude_top_k)]}
        return worst


# Ops whose output quantization is decided by their producer (fused or pass-through in QDQ):
# an error seen on their output is charged to the nearest compute node upstream.
_PASS_THROUGH = frozenset(
    {
        "Relu",
        "Clip",
        "MaxPool",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Slice",
        "Gather",
    }
)


def _compute_producer(tensor: str, producer: dict[str, onnx.NodeProto]) -> str | None:
    node = producer.get(tensor)
    for _ in range(16):
        if node is None or node.op_type not in _PASS_THROUGH or not node.input:
            break
        node = producer.get(node.input[0])
    return node.name if node is not None and node.op_type not in _PASS_THROUGH else None


class DynamicQuantizeConfig(PassConfig):
    weight_type: QuantTypeName = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: list[str] | None = None


class DynamicQuantize(Pass[DynamicQuantizeConfig]):
    name = "quantize_dynamic"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnxruntime.quantization import quantize_dynamic

        _quiet_ort_logs()
        src = _save(name_nodes(_copy(model)), ctx.work_dir / "dynamic_in.onnx")
        dst = ctx.work_dir / "dynamic_out.onnx"
        try:
            quantize_dynamic(
                str(src),
                str(dst),
                op_types_to_quantize=self.config.op_types,
                per_channel=self.config.per_channel,
                reduce_range=self.config.reduce_range,
                weight_type=_quant_type(self.config.weight_type),
            )
        except Exception as exc:
            raise PassFailed(f"dynamic quantization failed: {type(exc).__name__}: {str(exc)[:200]}") from exc
        return onnx.load(str(dst))


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
