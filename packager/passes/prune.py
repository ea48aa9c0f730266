"""Pruning passes.

``prune_magnitude`` (ONNX, any input): zeroes the smallest-magnitude share of each large weight
of Conv/Gemm/MatMul (unstructured, per tensor). Dense ONNX Runtime kernels do not run faster on
zeros; what it buys is a more compressible bundle for the transfer, at an accuracy cost the
gates measure. Structured channel pruning for PyTorch input lives in :mod:`packager.torch_input`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from pydantic import Field

from packager.passes.base import Pass, PassConfig, PassContext

WEIGHT_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


class MagnitudePruneConfig(PassConfig):
    sparsity: float = Field(ge=0.0, lt=1.0)
    min_params: int = Field(default=1024, ge=0)
    op_types: list[str] = Field(default_factory=lambda: list(WEIGHT_OPS))


class MagnitudePrune(Pass[MagnitudePruneConfig]):
    name = "prune_magnitude"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        out = onnx.ModelProto()
        out.CopyFrom(model)
        weight_names = {
            node.input[1] for node in out.graph.node if node.op_type in self.config.op_types and len(node.input) > 1
        }
        zeroed = total = 0
        for i, init in enumerate(out.graph.initializer):
            if init.name not in weight_names:
                continue
            w = numpy_helper.to_array(init)
            if w.dtype.kind != "f" or w.size < self.config.min_params:
                continue
            k = int(w.size * self.config.sparsity)
            if k == 0:
                continue
            flat = np.abs(w).ravel()
            threshold = np.partition(flat, k - 1)[k - 1]
            pruned = np.where(np.abs(w) <= threshold, np.zeros_like(w), w)
            zeroed += int((pruned == 0).sum() - (w == 0).sum())
            total += w.size
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(pruned.astype(w.dtype), init.name))
        self.notes["weights_zeroed"] = zeroed
        self.notes["weights_considered"] = total
        return out
