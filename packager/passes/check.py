"""The final op-support check of a model against a hardware profile's constraints.

The pass knows only its :class:`OpSupportConfig`; :func:`packager.pipeline.op_support_config` builds
one from a profile, so the passes do not depend on the profile schema.
"""

from __future__ import annotations

import onnx

from packager.onnx_utils import CONTROL_FLOW_OPS, io_specs, main_opset, op_types
from packager.passes.base import Pass, PassConfig, PassContext


class OpSupportConfig(PassConfig):
    profile: str
    opset_min: int
    opset_max: int
    static_only: bool
    allow_control_flow: bool
    allow: list[str] | None
    deny: list[str]
    max_rank: int | None = None


def _matches(entry: str, domain: str, op: str) -> bool:
    if ":" in entry:
        dom, name = entry.split(":", 1)
        return name == op and dom == domain
    # A bare name means the ONNX domain; Q/DQ also match their com.microsoft (16-bit) twins.
    return entry == op and (domain in ("", "ai.onnx") or op in ("QuantizeLinear", "DequantizeLinear"))


def op_support_problems(model: onnx.ModelProto, cfg: OpSupportConfig) -> list[str]:
    """Every reason the profile cannot run ``model`` (empty when it can)."""
    problems: list[str] = []
    opset = main_opset(model)
    if not cfg.opset_min <= opset <= cfg.opset_max:
        problems.append(f"opset {opset} outside the profile's {cfg.opset_min}-{cfg.opset_max}")
    ops = op_types(model)
    for domain, op in ops:
        label = f"{domain}:{op}" if domain else op
        if not cfg.allow_control_flow and op in CONTROL_FLOW_OPS:
            problems.append(f"control flow op {label} not allowed")
        elif any(_matches(d, domain, op) for d in cfg.deny):
            problems.append(f"op {label} is denied")
        elif cfg.allow is not None and not any(_matches(a, domain, op) for a in cfg.allow):
            problems.append(f"op {label} is not in the profile's allow list")
    if cfg.static_only:
        for spec in io_specs(model, "input") + io_specs(model, "output"):
            if any(not isinstance(d, int) for d in spec.shape):
                problems.append(f"{spec.name} has dynamic shape {list(spec.shape)}; the profile needs static shapes")
    if cfg.max_rank is not None:
        for spec in io_specs(model, "input"):
            if len(spec.shape) > cfg.max_rank:
                problems.append(f"input {spec.name} has rank {len(spec.shape)} > {cfg.max_rank}")
    return problems


class OpSupportCheck(Pass[OpSupportConfig]):
    """Does not change the model; records the problems found (the ladder's ``op_support`` gate reads them)."""

    name = "op_support_check"

    def run(self, model: onnx.ModelProto, ctx: PassContext) -> onnx.ModelProto:
        problems = op_support_problems(model, self.config)
        self.notes["ops"] = sorted({f"{d}:{o}" if d else o for d, o in op_types(model)})
        self.notes["problems"] = problems
        return model
