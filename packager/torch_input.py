"""PyTorch input: TorchScript files, ``ExportedProgram`` (``.pt2``) files and ``nn.Module`` objects.

Everything here imports torch, and only this module does: ONNX input never reaches it.
Models are exported with ``torch.onnx.export(dynamo=False)`` (the TorchScript-based exporter;
the dynamo exporter needs onnxscript, which the packager does not require), opset 17, with a
dynamic batch dimension. An ``ExportedProgram`` is exported through ``ep.module()``.

Structured channel pruning (:func:`prune_channels`) is our own, for chains of Conv2d / Linear
layers (``nn.Sequential``-like models, traced with ``torch.fx``): it removes the output channels
with the smallest L1 filter norm from every prunable layer but the last, and the matching inputs
of the following layer (and BatchNorm statistics, and the flattened features of a following
Linear). The pruned network is really smaller (fewer parameters and FLOPs); no fine-tuning is
done, so the accuracy gates decide whether the pruned model ships.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeota_contract.manifest import PassRecord
from packager.errors import ModelInputError, PackagerError
from packager.ladder import SourceModel
from packager.onnx_utils import parse_onnx_bytes, sha256_bytes

EXPORT_OPSET = 17


def _example_and_names(
    example_inputs: Any, calibration_path: Path | None
) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """Example tensors for tracing and the ONNX input names (from the calibration file's keys)."""
    names: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    if calibration_path is not None:
        try:
            with np.load(calibration_path, allow_pickle=False) as npz:
                arrays = {k: npz[k][:1] for k in npz.files if k != "labels"}
        except Exception:
            arrays = {}
        names = list(arrays)
    if example_inputs is None:
        if not arrays:
            raise PackagerError("PyTorch input needs example inputs or calibration data to trace the model")
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays.values()), names
    if isinstance(example_inputs, torch.Tensor):
        examples: tuple[torch.Tensor, ...] = (example_inputs,)
    elif isinstance(example_inputs, tuple) and all(isinstance(d, int) for d in example_inputs):
        examples = (torch.zeros(*example_inputs),)
    else:
        examples = tuple(example_inputs)
    if len(names) != len(examples):
        names = ["input"] if len(examples) == 1 else [f"input_{i}" for i in range(len(examples))]
    return examples, names


def export_to_onnx(module: nn.Module, examples: tuple[torch.Tensor, ...], input_names: list[str]) -> bytes:
    import warnings

    _eval_mode(module)
    with torch.no_grad():
        outs = module(*examples)
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 1
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    axes = {n: {0: "N"} for n in [*input_names, *output_names]}
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                examples,
                buf,  # type: ignore[arg-type]  # a file object works; the stubs name only paths
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=EXPORT_OPSET,
                dynamo=False,
            )
    except Exception as exc:
        raise PackagerError(f"ONNX export of the PyTorch model failed: {str(exc).splitlines()[0][:300]}") from exc
    return buf.getvalue()


class _Unregistered(nn.Module):
    """Holds an ExportedProgram's module without registering it: that module refuses ``train()``/``eval()``,
    which the TorchScript exporter calls on every submodule. Its weights are traced in as constants."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        for param in inner.parameters():
            param.requires_grad_(False)  # traced in as constants, which must not require grad
        object.__setattr__(self, "_inner", inner)

    def forward(self, *args: Any) -> Any:
        inner: nn.Module = self.__dict__["_inner"]
        return inner(*args)


def _eval_mode(module: nn.Module) -> None:
    """``module.eval()``; an ExportedProgram's module is already in eval form and refuses the call."""
    with contextlib.suppress(NotImplementedError):
        module.eval()


def _state_sha256(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _record(fmt: str, sha: str, input_names: list[str]) -> PassRecord:
    return PassRecord(
        name="torch_export",
        config={
            "source_format": fmt,
            "source_sha256": sha,
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": EXPORT_OPSET,
            "input_names": input_names,
            "torch": torch.__version__,
        },
    )


def _load_module_file(path: Path) -> tuple[nn.Module, str, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelInputError(f"model file {path} does not exist") from None
    except OSError as exc:
        raise ModelInputError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    sha = sha256_bytes(data)
    if path.suffix.lower() == ".pt2":
        try:
            ep = torch.export.load(str(path))  # type: ignore[no-untyped-call]
        except Exception as exc:
            raise ModelInputError(
                f"{path} is not a loadable ExportedProgram (.pt2): {str(exc).splitlines()[0][:200]}"
            ) from exc
        return _Unregistered(ep.module()), sha, "exported_program"
    try:
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelInputError(f"{path} is not a loadable TorchScript file: {str(exc).splitlines()[0][:200]}") from exc
    return module, sha, "torchscript"


def _to_source(
    module: nn.Module,
    sha: str,
    fmt: str,
    example_inputs: Any,
    calibration: Path | None,
    extra: list[PassRecord] | None = None,
) -> SourceModel:
    examples, names = _example_and_names(example_inputs, calibration)
    onnx_bytes = export_to_onnx(module, examples, names)
    model = parse_onnx_bytes(onnx_bytes, "exported ONNX model")
    return SourceModel(model, sha, fmt, [*(extra or []), _record(fmt, sha, names)])


def load_torch_file(path: Path, example_inputs: Any, calibration: Path | None) -> SourceModel:
    module, sha, fmt = _load_module_file(Path(path))
    return _to_source(module, sha, fmt, example_inputs, calibration)


def load_torch_module(module: nn.Module, example_inputs: Any, calibration: Path | None) -> SourceModel:
    if not isinstance(module, nn.Module):
        raise ModelInputError(f"expected a path or a torch.nn.Module, got {type(module).__name__}")
    return _to_source(module, _state_sha256(module), "nn_module", example_inputs, calibration)


def load_torch_pruned(model: Any, example_inputs: Any, calibration: Path | None, ratio: float) -> SourceModel:
    """Load, prune channels (when the graph allows), then export."""
    if isinstance(model, nn.Module):
        module, sha, fmt = model, _state_sha256(model), "nn_module"
    else:
        module, sha, fmt = _load_module_file(Path(model))
    examples, _ = _example_and_names(example_inputs, calibration)
    record: PassRecord
    try:
        pruned, summary = prune_channels(module, examples, ratio)
        record = PassRecord(
            name="prune_channels", config={"ratio": ratio, "criterion": "l1_filter_norm", "result": summary}
        )
    except PackagerError as exc:
        pruned = module
        record = PassRecord(name="prune_channels", config={"ratio": ratio, "skipped": str(exc)})
    return _to_source(pruned, sha, fmt, example_inputs, calibration, [record])


# ---- structured channel pruning ------------------------------------------------------------

_ELEMENTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.ELU,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


def _clone_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def prune_channels(
    module: nn.Module, examples: tuple[torch.Tensor, ...], ratio: float
) -> tuple[nn.Module, dict[str, Any]]:
    """Remove ``ratio`` of the output channels of every Conv2d/Linear in a chain but the last.

    Works on models whose ``torch.fx`` trace is a single chain of modules (plus ``flatten``).
    Raises :class:`PackagerError` when the graph is not such a chain (callers then skip pruning).
    """
    import torch.fx as fx

    if isinstance(module, torch.jit.ScriptModule):
        raise PackagerError("structured pruning needs an nn.Module or ExportedProgram, not TorchScript")
    model = _clone_module(module)
    _eval_mode(model)
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:
        raise PackagerError(f"structured pruning: model is not fx-traceable ({type(exc).__name__})") from exc
    chain: list[tuple[str, Any]] = []  # (kind, target) in execution order
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if len(node.users) > 1 or len([a for a in node.all_input_nodes]) > 1:
            raise PackagerError("structured pruning: the graph is not a single chain")
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Flatten):
            chain.append(("flatten", None))
        elif node.op == "call_module":
            chain.append(("module", node.target))
        elif (node.op == "call_function" and node.target in (torch.flatten,)) or (
            node.op == "call_method" and node.target in ("flatten", "view", "reshape")
        ):
            chain.append(("flatten", None))
        else:
            raise PackagerError(f"structured pruning: unsupported op {node.target} in the chain")
    modules = dict(gm.named_modules())
    # shapes after each step, to map conv channels -> flattened features
    shapes: list[tuple[int, ...]] = []
    with torch.no_grad():
        x = examples[0]
        for kind, target in chain:
            x = torch.flatten(x, 1) if kind == "flatten" else modules[target](x)
            shapes.append(tuple(x.shape))
    prunable = [i for i, (k, t) in enumerate(chain) if k == "module" and isinstance(modules[t], (nn.Conv2d, nn.Linear))]
    if len(prunable) < 2:
        raise PackagerError("structured pruning: fewer than two Conv2d/Linear layers")
    summary: dict[str, Any] = {}
    params_before = sum(p.numel() for p in gm.parameters())
    for pos, idx in enumerate(prunable[:-1]):
        layer = modules[chain[idx][1]]
        nxt_idx = prunable[pos + 1]
        nxt = modules[chain[nxt_idx][1]]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        out_ch = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        keep_n = max(1, out_ch - int(out_ch * ratio))
        if keep_n == out_ch:
            continue
        norms = layer.weight.detach().abs().reshape(out_ch, -1).sum(dim=1)
        keep = torch.sort(torch.argsort(norms, descending=True)[:keep_n]).values
        _shrink_out(layer, keep)
        flatten_spatial: int | None = None
        for k in range(idx + 1, nxt_idx):
            kind, target = chain[k]
            if kind == "flatten":
                before = shapes[k - 1]
                flatten_spatial = int(np.prod(before[2:])) if len(before) > 2 else 1
                continue
            mod = modules[target]
            if isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
                _shrink_bn(mod, keep)
            elif not isinstance(mod, _ELEMENTWISE):
                raise PackagerError(f"structured pruning: cannot prune through {type(mod).__name__}")
        if isinstance(nxt, nn.Conv2d):
            if flatten_spatial is not None:
                raise PackagerError("structured pruning: flatten before a Conv2d")
            _shrink_in_conv(nxt, keep)
        else:
            if flatten_spatial is not None:
                feats = (keep[:, None] * flatten_spatial + torch.arange(flatten_spatial)[None, :]).reshape(-1)
                _shrink_in_linear(nxt, feats)
            else:
                _shrink_in_linear(nxt, keep)
        summary[str(chain[idx][1])] = {"channels_before": int(out_ch), "channels_after": int(keep_n)}
    gm.recompile()
    with torch.no_grad():
        gm(*examples)  # the pruned graph must still run
    summary["params_before"] = int(params_before)
    summary["params_after"] = int(sum(p.numel() for p in gm.parameters()))
    return gm, summary


def _shrink_out(layer: nn.Conv2d | nn.Linear, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone())
    if isinstance(layer, nn.Conv2d):
        layer.out_channels = len(keep)
    else:
        layer.out_features = len(keep)


def _shrink_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d, keep: torch.Tensor) -> None:
    bn.num_features = len(keep)
    if bn.affine:
        bn.weight = nn.Parameter(bn.weight.detach()[keep].clone())
        bn.bias = nn.Parameter(bn.bias.detach()[keep].clone())
    if bn.running_mean is not None and bn.running_var is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()


def _shrink_in_conv(conv: nn.Conv2d, keep: torch.Tensor) -> None:
    conv.weight = nn.Parameter(conv.weight.detach()[:, keep].clone())
    conv.in_channels = len(keep)


def _shrink_in_linear(linear: nn.Linear, keep: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, keep].clone())
    linear.in_features = len(keep)
