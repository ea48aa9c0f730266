"""Integer quantization passes on ONNX Runtime's quantization tool: static (QDQ / QOperator) and
dynamic. fp16 and int4 weight-only are in :mod:`packager.passes.weights`.

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
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from pydantic import Field

from packager.onnx_utils import main_opset, name_nodes, op_types
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
    keep_float: list[Literal["first", "last"]] | None = None


class StaticQuantize(Pass[StaticQuantizeConfig]):
    name = "quantize_static"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if ctx.calibration is None:
            raise PassFailed("static quantization needs calibration data")
        _require_weight_ops(model, "static")
        src = _save(name_nodes(_copy(model)), ctx.work_dir / "static_in.onnx")
        excluded: list[str] = kept_float_nodes(model, self.config.keep_float or [])
        if excluded:
            self.notes["kept_float"] = list(excluded)
        if self.config.exclude_top_k > 0:
            if self.config.format != "qdq":
                raise PassFailed("node exclusion by activation error needs the QDQ format")
            first = self._quantize(src, ctx, ctx.work_dir / "static_probe.onnx", excluded)
            worst = self._worst_nodes(src, first, ctx)
            self.notes["excluded_nodes"] = worst
            excluded = excluded + [n for n in worst if n not in excluded]
            ctx.log(f"keeping in float: {', '.join(excluded) or 'nothing'}")
        out = self._quantize(src, ctx, ctx.work_dir / "static_out.onnx", excluded)
        quantized = onnx.load(str(out))
        _require_quantized(quantized, "static")
        return quantized

    def _quantize(self, src: Path, ctx: PassContext, dst: Path, exclude: list[str], cache: Path | None = None) -> Path:
        """Quantize ``src`` into ``dst`` keeping ``exclude`` in float.

        ``cache`` (a JSON file path) keeps the calibrated ranges: the first call writes it, later calls
        with other exclusions reuse it instead of calibrating again.
        """
        from onnxruntime.quantization import QuantFormat, quantize_static

        from packager.data import make_reader

        _quiet_ort_logs()
        cfg = self.config
        batch = cfg.calibration_batch
        if cfg.calibration != "minmax":
            # ORT's histogram calibrators stack per-batch outputs: every batch must have the same size.
            batch = even_batch(min(cfg.calibration_samples, ctx.calibration.count), batch)
        reader = make_reader(ctx.calibration, cfg.calibration_samples, batch)
        extra = {
            # No "CalibMaxIntermediateOutputs": in ORT 1.31 MinMaxCalibrater.collect_data drops every full group
            # of that many batches without computing its ranges (only the remainder is calibrated; a multiple
            # raises "No data is collected"). The sample cap bounds the memory instead.
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
                    calibration_cache_path=cache,
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
            node = compute_producer(tensor, producer)
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


def even_batch(samples: int, batch: int) -> int:
    """The largest batch size <= ``batch`` that divides ``samples`` (so every batch is full)."""
    for size in range(min(batch, samples), 0, -1):
        if samples % size == 0:
            return size
    return 1


WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU"})


def kept_float_nodes(model: onnx.ModelProto, which: Sequence[str]) -> list[str]:
    """Names of the first and/or last weight-bearing nodes in graph order (``which`` holds "first"/"last")."""
    compute = [n.name for n in name_nodes(_copy(model)).graph.node if n.op_type in WEIGHT_OPS]
    if not compute:
        return []
    picked = ([compute[0]] if "first" in which else []) + ([compute[-1]] if "last" in which else [])
    return list(dict.fromkeys(picked))


# Ops whose output quantization is decided by their producer (fused or pass-through in QDQ):
# an error seen on their output is charged to the nearest compute node upstream.
PASS_THROUGH_OPS = frozenset(
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


def compute_producer(tensor: str, producer: dict[str, onnx.NodeProto]) -> str | None:
    node = producer.get(tensor)
    for _ in range(16):
        if node is None or node.op_type not in PASS_THROUGH_OPS or not node.input:
            break
        node = producer.get(node.input[0])
    return node.name if node is not None and node.op_type not in PASS_THROUGH_OPS else None


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
        _require_weight_ops(model, "dynamic")
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
        quantized = onnx.load(str(dst))
        _require_quantized(quantized, "dynamic")
        return quantized


_QUANT_OPS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger"})


def _require_weight_ops(model: onnx.ModelProto, kind: str) -> None:
    """Fail fast (before calibrating) when the main graph has no weight-bearing op to quantize."""
    if not any(n.op_type in WEIGHT_OPS for n in model.graph.node):
        raise PassFailed(
            f"{kind} quantization has nothing to quantize: no {'/'.join(sorted(WEIGHT_OPS))} in the main graph "
            "(compute inside If/Loop subgraphs is not quantized by ONNX Runtime)"
        )


def _require_quantized(model: onnx.ModelProto, kind: str) -> None:
    """Raise :class:`PassFailed` when the quantizer left every node in float.

    ORT's quantizers only see the main graph: a model whose compute sits inside ``If``/``Loop``
    subgraphs (silero-vad's control-flow variant) comes back unchanged, and calling that int8
    would be a lie in the manifest.
    """
    if not any(op in _QUANT_OPS or op.startswith("QLinear") for _dom, op in op_types(model)):
        raise PassFailed(
            f"{kind} quantization quantized nothing (no quantizable op in the main graph; "
            "compute inside If/Loop subgraphs is not quantized by ONNX Runtime)"
        )
