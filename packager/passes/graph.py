"""Graph-level passes: load check, static shapes, opset conversion, shape inference, simplification."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
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
    axes: dict[str, int] | None = None  # inputs batching on another axis than 0, e.g. {"state": 1}


class FixShapes(Pass[FixShapesConfig]):
    """Pin dynamic batch dimensions of graph inputs/outputs (for static-shape accelerators)."""

    name = "fix_shapes"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        return fix_batch_dim(model, self.config.batch, self.config.axes)


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
    strip_metadata: bool = True  # metadata_props (e.g. the quantizer's pre-processing flags)
    drop_unused: bool = True  # initializers no node reads, opset imports no node uses
    compact_names: bool = True  # internal tensor names -> short ids, node names dropped (graph I/O kept)


class Finalize(Pass[FinalizeConfig]):
    """Drop the bytes runtimes do not need; never changes numerics or the graph's inputs and outputs.

    Intermediate ``value_info`` (shape annotations), doc strings, ``metadata_props``, unused
    initializers and opset imports; then internal tensor names become short ids (``a``, ``b``...,
    in order of first appearance, so the result is deterministic) and node names are dropped.
    Names are only compacted in models without subgraphs (a subgraph may read outer names).
    """

    name = "finalize"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        before = out.ByteSize()
        graph = out.graph
        for g in all_graphs(graph):  # subgraphs (If/Loop bodies) too
            if self.config.strip_value_info:
                del g.value_info[:]
                if g is not graph:  # subgraph output shapes are optional annotations (shape inference adds them)
                    for vi in g.output:
                        if vi.type.HasField("tensor_type"):
                            vi.type.tensor_type.ClearField("shape")
            if self.config.strip_doc_strings:
                g.doc_string = ""
                for node in g.node:
                    node.doc_string = ""
        if self.config.strip_doc_strings:
            out.doc_string = ""
        if self.config.strip_metadata:
            del out.metadata_props[:]
        has_subgraphs = any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute
        )
        if self.config.drop_unused and not has_subgraphs:
            used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
            keep = [i for i in graph.initializer if i.name in used]
            if len(keep) != len(graph.initializer):
                self.notes["initializers_dropped"] = len(graph.initializer) - len(keep)
                del graph.initializer[:]
                graph.initializer.extend(keep)
            domains = {n.domain or "" for n in graph.node}
            imports = [o for o in out.opset_import if (o.domain or "") in domains or o.domain in ("", "ai.onnx")]
            if len(imports) != len(out.opset_import):
                del out.opset_import[:]
                out.opset_import.extend(imports)
        if self.config.compact_names and not has_subgraphs and not graph.sparse_initializer:
            _compact_names(graph)
        self.notes["bytes_saved"] = before - out.ByteSize()
        return out


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes, depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from all_graphs(sub)


def _bare_size(model: onnx.ModelProto) -> int:
    """Serialized size without shape annotations (what Finalize will ship)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for g in all_graphs(copy.graph):
        del g.value_info[:]
    return int(copy.ByteSize())


def _short_names(taken: set[str]) -> Iterator[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    for length in range(1, 8):
        for combo in itertools.product(alphabet, repeat=length):
            name = "".join(combo)
            if name not in taken:
                yield name


def _compact_names(graph: onnx.GraphProto) -> None:
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    mapping: dict[str, str] = {}
    fresh = _short_names(keep)

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = next(fresh)
        return mapping[name]

    for init in graph.initializer:
        init.name = short(init.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


class SimplifyConfig(PassConfig):
    backend: Literal["onnxslim", "none"] = "onnxslim"


class Simplify(Pass[SimplifyConfig]):
    """Constant folding, dead-code removal and pattern fusion with onnxslim.

    Falls back to the input when onnxslim fails or makes the model larger (never larger than the source).
    """

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
        size_in, size_out = _bare_size(model), _bare_size(slim)
        if size_out > size_in:
            # e.g. silero-vad's nested If branches: folding constants per branch duplicates weights
            self.notes["skipped"] = f"onnxslim made the model larger ({size_in} -> {size_out} bytes); kept the input"
            ctx.log(str(self.notes["skipped"]))
            return model
        result: onnx.ModelProto = slim
        return result
