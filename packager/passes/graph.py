"""Graph-level passes: load check, static shapes, opset conversion, shape inference, simplification."""

from __future__ import annotations

from typing import Literal

import onnx
from pydantic import Field

from packager.onnx_utils import fix_batch_dim, main_opset
from packager.passes.base import Pass, PassConfig, PassContext, PassFailed


class LoadOnnxConfig(PassConfig):
    source_sha256: str
    source_format: Literal["onnx", "torchscript", "exported_program", "nn_module"] = "onnx"
    checker: Literal["onnx.checker"] = "onnx.checker"


class LoadOnnx(Pass[LoadOnnxConfig]):
    """Records where the model came from; loading and checking happen in :mod:`packager.onnx_utils`."""

    name = "load_onnx"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        return model


class FixShapesConfig(PassConfig):
    batch: int = Field(ge=1)


class FixShapes(Pass[FixShapesConfig]):
    """Pin dynamic batch dimensions of graph inputs/outputs (for static-shape accelerators)."""

    name = "fix_shapes"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        return fix_batch_dim(model, self.config.batch)


class ConvertOpsetConfig(PassConfig):
    target_opset: int = Field(ge=7, le=30)


class ConvertOpset(Pass[ConvertOpsetConfig]):
    """Move the model to ``target_opset`` with ``onnx.version_converter`` (only when out of range)."""

    name = "convert_opset"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        from onnx import version_converter

        before = main_opset(model)
        if before == self.config.target_opset:
            return model
        try:
            converted = version_converter.convert_version(model, self.config.target_opset)
            onnx.checker.check_model(converted)
        except Exception as exc:
            raise PassFailed(f"cannot convert opset {before} -> {self.config.target_opset}: {exc}") from exc
        self.notes["from_opset"] = before
        return converted


class ShapeInferenceConfig(PassConfig):
    data_prop: bool = True
    strict: bool = False


class ShapeInference(Pass[ShapeInferenceConfig]):
    name = "shape_inference"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        try:
            return onnx.shape_inference.infer_shapes(
                model, check_type=True, strict_mode=self.config.strict, data_prop=self.config.data_prop
            )
        except Exception as exc:
            raise PassFailed(f"shape inference failed: {str(exc).splitlines()[0][:300]}") from exc


class FinalizeConfig(PassConfig):
    strip_value_info: bool = True
    strip_doc_strings: bool = True


class Finalize(Pass[FinalizeConfig]):
    """Drop what runtimes do not need: intermediate ``value_info`` (shape annotations) and doc strings."""

    name = "finalize"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        if self.config.strip_value_info:
            del out.graph.value_info[:]
        if self.config.strip_doc_strings:
            out.doc_string = ""
            out.graph.doc_string = ""
            for node in out.graph.node:
                node.doc_string = ""
        return out


class SimplifyConfig(PassConfig):
    backend: Literal["onnxslim", "none"] = "onnxslim"


class Simplify(Pass[SimplifyConfig]):
    """Constant folding, dead-code removal and pattern fusion with onnxslim (falls back to the input)."""

    name = "simplify"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        if self.config.backend == "none":
            return model
        import onnxslim

        before = len(model.graph.node)
        try:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # onnxslim edits its input in place
            slim = onnxslim.slim(copy)
        except Exception as exc:  # a simplifier bug must not sink the model: keep it as it was
            self.notes["skipped"] = f"onnxslim failed: {type(exc).__name__}"
            ctx.log(f"onnxslim failed ({exc}); keeping the model unsimplified")
            return model
        if slim is None:
            self.notes["skipped"] = "onnxslim returned nothing"
            return model
        self.notes["nodes_before"] = before
        self.notes["nodes_after"] = len(slim.graph.node)
        result: onnx.ModelProto = slim
        return result
